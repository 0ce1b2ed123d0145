"""The compile cache's key: everything that changes the graph our pipeline produces, as one SHA-256.

Two halves. The backend's half (``identity``) is known before anything is traced: our code, torch's version,
the Mapping (with the rank) and its process-group names, the pipeline config, the patterns and passes. Patterns
are identified by their fields and the source files of their functions, not by their traced graphs, so a hit
needs no pattern tracing. The graph's half (``describe_graph``) is the captured Dynamo graph: its code, every
input's type, shape, stride, dtype, device and aliasing, the values of its tensor constants, and what the ShapeEnv
assumes about its symbols (guards, ranges, replacements): equal descriptions trace to equal graphs.

A user pass with state and no ``uuid()`` (an object whose attributes, or a closure whose cells, cannot be pickled)
cannot be identified; its Backend then does not cache (the report says which pass).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import torch.fx

from fxpasses import compat


class Unidentifiable(Exception):
    """A pass or pattern whose behaviour the key cannot capture; the message says which and what to do."""


def digest(value: Any) -> str:
    """SHA-256 of a JSON-able description (anything else by its ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def graph_key(backend: dict[str, Any], graph: dict[str, Any], state: dict[str, Any], with_values: bool) -> str:
    """The key of one graph's entry: the backend's identity (``Backend.cache_identity()``), the graph's description
    (``describe_graph``), the process state (``global_state``), and whether the entry keeps node values."""
    return digest({"format": "fxpasses-graph-1", "backend": backend, "graph": graph, "state": state,
                   "values": with_values})


# ---- code identity -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _files_of(obj: Any) -> list[Path]:
    """Source files whose edit could change ``obj``: its module's whole top-level package (a helper it calls may
    live in a sibling module), or its one file. torch and fxpasses are covered by the version and the code digest."""
    module = inspect.getmodule(obj)
    if module is None:
        return []
    top = module.__name__.split(".")[0]
    if top in ("torch", "fxpasses", "builtins", "operator", "functools"):
        return []
    root = sys.modules.get(top)
    package_dir = getattr(root, "__path__", None)
    if package_dir:
        return sorted(p for d in package_dir for p in Path(d).rglob("*.py"))
    file = getattr(module, "__file__", None)
    return [Path(file)] if file else []


def source_digest(obj: Any) -> str:
    """Hash of the source files that define ``obj`` (see ``_files_of``)."""
    h = hashlib.sha256()
    for path in _files_of(obj):
        try:
            stat = path.stat()
            h.update(str(path).encode() + _file_digest(str(path), stat.st_mtime_ns, stat.st_size).encode())
        except OSError:
            h.update(f"missing:{path}".encode())
    return h.hexdigest()[:16]


def _state_digest(what: str, state: Any) -> str:
    try:
        return hashlib.sha256(pickle.dumps(state, protocol=4)).hexdigest()[:16]
    except Exception as err:  # noqa: BLE001
        raise Unidentifiable(f"{what} holds state that cannot be pickled ({type(err).__name__}); give it a "
                             "uuid() method returning a string that changes whenever its behaviour does") from None


def _const(value: Any) -> str:
    """A code constant as a string that is the same in every process (no addresses, no set order)."""
    if hasattr(value, "co_code"):
        return _code(value)
    if isinstance(value, (frozenset, set)):
        return "{" + ",".join(sorted(_const(v) for v in value)) + "}"
    if isinstance(value, tuple):
        return "(" + ",".join(_const(v) for v in value) + ")"
    return repr(value)


def _code(code: Any) -> str:
    return hashlib.sha256(code.co_code + _const(code.co_consts).encode() + repr(code.co_names).encode()).hexdigest()


def _code_digest(fn: Any) -> str:
    code = getattr(fn, "__code__", None)
    return _code(code)[:16] if code is not None else ""


def callable_identity(obj: Any, what: str) -> str:
    """A string that changes whenever ``obj`` (a pass, a pattern's function) behaves differently.

    ``uuid()`` wins (torch's CustomGraphPass convention). Otherwise: its qualified name, code, source files, and the
    pickled state it carries (defaults, closure cells, partial arguments, an instance's attributes)."""
    obj = getattr(obj, "original", obj)  # a user_passes.UserPass: what the user gave
    uuid = getattr(obj, "uuid", None)
    if callable(uuid) and not inspect.isclass(obj):
        value = uuid()
        if value is not None:
            return f"uuid:{type(obj).__qualname__}:{value}"
    if isinstance(obj, functools.partial):
        return (f"partial({callable_identity(obj.func, what)}):"
                + _state_digest(what, (obj.args, sorted(obj.keywords.items()))))
    if inspect.ismethod(obj):
        return f"method:{callable_identity(obj.__func__, what)}:{callable_identity(obj.__self__, what)}"
    if inspect.isfunction(obj):
        cells = tuple(c.cell_contents for c in (obj.__closure__ or ()))
        state = _state_digest(what, (obj.__defaults__, obj.__kwdefaults__, cells)) if (
            obj.__defaults__ or obj.__kwdefaults__ or cells) else ""
        return f"fn:{obj.__module__}.{obj.__qualname__}:{_code_digest(obj)}:{source_digest(obj)}:{state}"
    if inspect.isclass(obj) or inspect.isbuiltin(obj):
        return f"class:{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}:{source_digest(obj)}"
    cls = type(obj)
    if isinstance(obj, (compat.OpOverload, compat.HigherOrderOperator)):
        return f"op:{obj}"
    state = _state_digest(what, vars(obj)) if hasattr(obj, "__dict__") else ""
    return f"object:{cls.__module__}.{cls.__qualname__}:{source_digest(cls)}:{state}"


def pattern_identity(pattern: Any) -> str:
    """A registered Pattern without tracing it: its fields and the source of every function it is made of.
    Its traced graphs are a function of these, torch's version and the decomposition table (all in the key)."""
    parts = [pattern.name, str(pattern.benefit), repr(pattern.trace_dtypes), repr(pattern.input_names),
             pattern.applies_doc, str(pattern.explain_when_off)]
    functions = [pattern.spellings, pattern.example_inputs, pattern.replace, pattern.applies, pattern.hint,
                 *pattern.checks]
    parts += [callable_identity(f, f"pattern {pattern.name!r}") for f in functions if f is not None]
    return "|".join(parts)


# ---- the captured graph --------------------------------------------------------------------------------------
def _value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return {
            "type": type(v).__name__ if not compat.fake_tensor_mode_of(v) else "Tensor",
            "dtype": str(v.dtype), "shape": [str(s) for s in v.shape], "stride": [str(s) for s in v.stride()],
            "offset": str(v.storage_offset()), "device": str(v.device), "layout": str(v.layout),
            "requires_grad": v.requires_grad, "view": v._base is not None, "inference": v.is_inference(),
        }
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return {"sym": type(v).__name__, "expr": str(v.node.expr)}
    return {"type": type(v).__name__, "repr": repr(v)}


def _aliasing(values: list[Any]) -> list[int]:
    """For each input, the first input that shares its storage (itself when none): aliasing changes AOT's graph."""
    from torch.multiprocessing.reductions import StorageWeakRef

    first: dict[Any, int] = {}
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            try:
                out.append(first.setdefault(StorageWeakRef(v.untyped_storage()), i))
                continue
            except Exception:  # noqa: BLE001  (a tensor without storage)
                pass
        out.append(i)
    return out


def _constants(gm: torch.fx.GraphModule) -> dict[str, str]:
    out = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            out[str(node.target)] = _value(value) | {
                "data": hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()}
        elif isinstance(value, torch.fx.GraphModule):
            out[str(node.target)] = value.code
    return out


def describe_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> dict[str, Any]:
    """Everything about a captured graph that AOT autograd's trace and our pipeline read."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    if any(v is None for v in values) or len(values) != len(example_inputs):
        values = list(example_inputs)
    shape_env = None
    for v in values:
        if isinstance(v, torch.Tensor) and compat.fake_tensor_mode_of(v) is not None:
            shape_env = compat.fake_tensor_mode_of(v).shape_env
            break
        if isinstance(v, torch.SymInt):
            shape_env = v.node.shape_env
            break
    modules = {name: m.code for name, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and name}
    return {
        "code": gm.code,
        "submodules": modules,
        "inputs": [_value(v) for v in values],
        "aliasing": _aliasing(values),
        "constants": _constants(gm),
        "parameters": sorted(n for n, _ in gm.named_parameters()) + sorted(n for n, _ in gm.named_buffers()),
        "shape_env": compat.shape_env_facts(shape_env),
    }


def global_state() -> dict[str, Any]:
    """Process state AOT's trace depends on: grad mode (inference or training graph), autocast, AOT's config."""
    return {
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast": [torch.is_autocast_enabled(d) for d in ("cpu", "cuda")] if _autocast_takes_device() else
        [torch.is_autocast_enabled()],
        "default_dtype": str(torch.get_default_dtype()),
        "functorch": compat.functorch_config_digest(),
        "auto_functionalized_v2": compat.auto_functionalized_v2_enabled(),
    }


@functools.lru_cache(maxsize=1)
def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
        return True
    except TypeError:
        return False


# ---- a whole model (fxpasses.precompile) ---------------------------------------------------------------------
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def module_identity(model: torch.nn.Module) -> dict[str, Any]:
    """What a saved whole-model compile depends on in the model: each submodule's class (code and source files),
    its plain attributes (sizes, flags, eps: Dynamo bakes them into the graph), and its parameters' and buffers'
    specs. Not their values: the compiled function reads them at every call."""
    modules = []
    for name, module in model.named_modules():
        cls = type(module)
        attrs = {k: _plain_repr(v) for k, v in sorted(vars(module).items())
                 if not k.startswith("_") and _plain_repr(v) is not None}
        modules.append([name, f"{cls.__module__}.{cls.__qualname__}", source_digest(cls),
                        _code_digest(getattr(cls, "forward", None)), attrs])
    tensors = [[kind, name, str(t.dtype), list(t.shape), list(t.stride()), str(t.device), t.requires_grad]
               for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers()))
               for name, t in items]
    return {"modules": modules, "tensors": tensors}


def _plain_repr(value: Any) -> str | None:
    """A module attribute's value when it is plain data (what Dynamo may specialize on), else None."""
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return repr(value)
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        try:
            return repr(value)
        except Exception:  # noqa: BLE001
            return None
    return None
