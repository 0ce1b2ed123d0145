"""``fxpasses.precompile``: a server start that skips Dynamo's trace too.

fxpasses' compile cache (fxpasses.compile_cache) serves the graph our pipeline produced, but Dynamo still traces the
model in every process (on the tiny CPU Llama 4.2 s of a 4.6 s warm start). Dynamo's AOT compile
(``torch/_dynamo/aot_compile.py``, torch 2.11 and 2.13) saves what a trace produces (the rewritten bytecode, the
guards and the backend's result, when the backend returns a ``SerializableCallable``) and loads it without
tracing. ``precompile`` wires our Backend into it:

- a miss traces the model whole (``fullgraph``), compiles with the Backend (``Backend.compile_serializable``:
  the compile cache's self-contained entry, returned as ``cache_graph.SerializedGraph``), saves Dynamo's artifact
  atomically under a key, and returns the compiled function;
- a hit loads the artifact: no Dynamo trace, no AOT trace, no pipeline; the Backend rebuilds the runner (CUDA
  graphs are captured lazily, on each size's first call) and replays the report;
- a graph break, an unsupported model, a graph whose AOT runtime wrapper does work (never served from a cache,
  docs/caching.md), a corrupt or stale artifact: logged, and the model is compiled as before
  (``torch.compile(model, backend=backend)``), never a crash.

The module is an argument of the compiled function, not part of the artifact: every call reads its current
parameters and buffers (a KV cache is written in place, a changed weight is seen).
"""
from __future__ import annotations

import inspect
import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fxpasses import cache_key, compat
from fxpasses.backend import Backend
from fxpasses.cache_graph import PrecompileRefused, SerializedGraph
from fxpasses.compile_cache import default_cache_dir, read_framed, write_framed
from fxpasses.tokens import mark_token_dim

log = logging.getLogger("fxpasses.precompile")

ARTIFACT_FORMAT = 1  # bump when PrecompiledArtifact changes


@dataclass
class PrecompiledArtifact:
    """What a precompile file holds: Dynamo's serialized AOT compile and the key it was written for."""

    key: str
    torch_version: str
    dynamo: bytes  # compat.serialize_aot_compiled
    format: int = ARTIFACT_FORMAT


@dataclass(frozen=True)
class PrecompileStatus:
    """What ``precompile`` did: ``loaded`` (a hit: no Dynamo trace), ``saved`` (a miss compiled and written), or a
    fallback to ``torch.compile`` (``fallback``), and why."""

    loaded: bool
    saved: bool
    fallback: bool
    reason: str
    key: str | None
    path: Path | None
    seconds: float

    def __str__(self) -> str:
        what = "loaded" if self.loaded else "fallback to torch.compile" if self.fallback else "compiled"
        saved = ", saved" if self.saved else ""
        key = f" key {self.key[:12]}" if self.key else ""
        return f"precompile: {what}{key} ({self.reason}{saved}, {self.seconds:.2f} s)"


class Precompiled:
    """A precompiled model: call it as the model's ``forward``. ``status`` says whether it was loaded."""

    def __init__(self, model: torch.nn.Module, backend: Backend, status: PrecompileStatus,
                 compiled: Any = None) -> None:
        self.model = model
        self.backend = backend
        self.status = status
        self._compiled = compiled  # an AOTCompiledFunction, or None when falling back
        self._forward = compat.aot_compiled_parts(compiled)[1] if compiled is not None else None
        self._fallback: Callable[..., Any] | None = None
        self.guard_misses = 0  # calls the saved guards rejected (they ran through torch.compile)

    @property
    def fallback(self) -> Callable[..., Any]:
        """``torch.compile(model, backend=backend)``, built on first use."""
        if self._fallback is None:
            self._fallback = torch.compile(self.model, backend=self.backend)
        return self._fallback

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._forward is None:
            return self.fallback(*args, **kwargs)
        why = compat.aot_guard_failure(self._compiled, self.model, *args, **kwargs)
        if why is not None:  # inputs the saved guards do not cover: Dynamo compiles them, as torch.compile would
            if self.guard_misses == 0:
                log.warning("fxpasses precompile: the saved guards reject this call (%s); it runs through "
                            "torch.compile instead", why)
            self.guard_misses += 1
            return self.fallback(*args, **kwargs)
        return self._forward(self.model, *args, **kwargs)


def precompile(model: torch.nn.Module, example_inputs: Sequence[Any], *, backend: Backend | None = None,
               path: str | os.PathLike | None = None, dynamic: bool | Sequence[int] = True,
               example_kwargs: dict[str, Any] | None = None) -> Precompiled:
    """Compile ``model.forward`` for a server start: load a saved compile when one matches, else compile and save.

    Args:
        model: the module to compile (its ``forward``; module hooks do not run). Its parameters and buffers are
            read at every call, not saved.
        example_inputs: positional arguments of one call (e.g. ``(input_ids, position_ids, slot_ids)``).
        backend: a ``fxpasses.Backend`` (default ``Backend()``); Inductor backends fall back to torch.compile.
        path: a directory for the saved compiles (default: the Backend's compile-cache directory, else
            ``FXPASSES_CACHE_DIR`` or ``~/.cache/fxpasses``); files are ``<path>/precompiled/<key>.fxpc``.
        dynamic: True marks the token dimension (dim 0) of every tensor argument whose dim 0 has the first tensor
            argument's size (``fxpasses.mark_token_dim``: one compile serves 1 and 32 tokens); a list of argument
            positions marks those; False marks nothing (the caller's own marks are kept).
        example_kwargs: keyword arguments of the call, if any.

    The key covers the model's code and its parameters' and buffers' specs, the Backend (``cache_identity()``,
    CUDA-graph settings), torch and Python, Dynamo's and AOT's config, grad/inference mode, and the example inputs'
    specs (dtype, device, rank, static sizes): call ``precompile`` in the mode the server runs in
    (``torch.inference_mode()``)."""
    t0 = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"precompile: model must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, compat.optimized_module_type()):
        raise TypeError("precompile: model is already torch.compile'd; pass the original module "
                        "(model._orig_mod).")
    if isinstance(example_inputs, (str, bytes)) or not isinstance(example_inputs, Sequence):
        raise TypeError(f"precompile: example_inputs must be a tuple of the forward's positional arguments, got "
                        f"{type(example_inputs).__name__}.")
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    backend = backend if backend is not None else Backend()
    if not isinstance(backend, Backend):
        raise TypeError(f"precompile: backend must be a fxpasses.Backend, got {type(backend).__name__}; for another "
                        "backend use torch.compile.")
    _mark(args, dynamic)

    def fall_back(reason: str, key: str | None = None, file: Path | None = None) -> Precompiled:
        log.warning("fxpasses precompile: %s; compiling with torch.compile instead", reason)
        status = PrecompileStatus(False, False, True, reason, key, file, time.perf_counter() - t0)
        return Precompiled(model, backend, status)

    missing = compat.aot_precompile_missing()
    if missing is not None:
        return fall_back(missing)
    if backend.inductor:
        return fall_back("inductor=True: Inductor's result is not one fxpasses can save (Inductor's own caches "
                         "serve it)")
    try:
        key = artifact_key(model, args, kwargs, backend)
    except cache_key.Unidentifiable as err:
        return fall_back(str(err))
    file = _artifact_dir(path, backend) / "precompiled" / f"{key}.fxpc"

    compiled, why = _load(file, key, model, backend)
    if compiled is not None:
        status = PrecompileStatus(True, False, False, "loaded the saved compile", key, file, time.perf_counter() - t0)
        log.info("%s", status)
        return Precompiled(model, backend, status, compiled)

    refusals: list[str] = []

    def compiler(gm: torch.fx.GraphModule, inputs: list[Any]) -> SerializedGraph:
        try:
            return backend.compile_serializable(gm, inputs)
        except PrecompileRefused as err:
            refusals.append(str(err))
            raise

    try:
        compiled = compat.aot_compile_fullgraph(model.forward, args, kwargs, compiler)
    except Exception as err:  # noqa: BLE001  (graph breaks, unsupported code, refused graphs: compile as before)
        reason = refusals[-1] if refusals else f"Dynamo's whole-graph AOT compile failed ({_first_line(err)})"
        return fall_back(f"{why}; {reason}", key, file)
    try:
        data = compat.serialize_aot_compiled(compiled)
        payload = pickle.dumps(PrecompiledArtifact(key, torch.__version__, data), protocol=pickle.HIGHEST_PROTOCOL)
        failed = write_framed(file, payload)
    except Exception as err:  # noqa: BLE001  (the compile is good; only saving it failed)
        failed = f"the compile does not serialize ({_first_line(err)})"
    if failed is not None:
        log.warning("fxpasses precompile: not saved: %s", failed)
    status = PrecompileStatus(False, failed is None, False, why + (f"; not saved: {failed}" if failed else ""),
                              key, file, time.perf_counter() - t0)
    log.info("%s", status)
    return Precompiled(model, backend, status, compiled)


def _load(file: Path, key: str, model: torch.nn.Module, backend: Backend) -> tuple[Any, str]:
    """The saved AOTCompiledFunction for ``key`` bound to ``backend``, or None and why not (every failure a miss)."""
    payload, why = read_framed(file)
    if payload is None:
        return None, why.replace("first compile of this graph with these passes", "first precompile of this model")
    try:
        artifact = pickle.loads(payload)
    except Exception as err:  # noqa: BLE001
        return None, f"saved compile does not load ({type(err).__name__}), ignored"
    if not isinstance(artifact, PrecompiledArtifact) or artifact.format != ARTIFACT_FORMAT:
        return None, "saved compile from another format, ignored"
    if artifact.key != key:
        return None, "saved compile was written for another key, ignored"
    try:
        compiled = compat.deserialize_aot_compiled(artifact.dynamo, _forward_globals(model))
    except Exception as err:  # noqa: BLE001  (another torch or Python, a changed module layout)
        log.warning("fxpasses precompile: %s does not load: %s", file, _first_line(err))
        return None, f"saved compile does not load ({_first_line(err)}), ignored"
    graph = compat.aot_compiled_parts(compiled)[0]
    if not isinstance(graph, SerializedGraph):
        return None, f"saved compile holds a {type(graph).__name__}, not an fxpasses graph, ignored"
    try:
        backend.adopt_serialized(graph)
    except Exception as err:  # noqa: BLE001
        return None, f"saved graph does not load ({_first_line(err)}), ignored"
    return compiled, "hit"


# ---- the key -------------------------------------------------------------------------------------------------
def artifact_key(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], backend: Backend) -> str:
    """Everything a saved compile depends on, as one SHA-256 (see ``precompile``)."""
    return cache_key.digest({
        "format": f"fxpasses-precompile-{ARTIFACT_FORMAT}",
        "backend": backend.cache_identity(),
        "runtime": {"cuda_graph_sizes": backend.cuda_graph_sizes, "splitting_ops": list(backend.splitting_ops),
                    "token_inputs": list(backend.token_inputs)},
        "model": cache_key.module_identity(model),
        "args": [_input_spec(a) for a in args],
        "kwargs": {k: _input_spec(v) for k, v in sorted(kwargs.items())},
        "state": cache_key.global_state(),
        "dynamo": compat.dynamo_config_digest(),
        "python": sys.version,
    })


_MARKS = ("_dynamo_dynamic_indices", "_dynamo_weak_dynamic_indices", "_dynamo_unbacked_indices",
          "_dynamo_static_indices")


def _input_spec(value: Any) -> Any:
    """An example input as the compile sees it: a marked (dynamic) size is any size."""
    if isinstance(value, torch.Tensor):
        marked = set().union(*(getattr(value, m, set()) for m in _MARKS))
        return {"dtype": str(value.dtype), "device": str(value.device), "layout": str(value.layout),
                "shape": ["*" if d in marked else int(s) for d, s in enumerate(value.shape)],
                "contiguous": value.is_contiguous(), "requires_grad": value.requires_grad,
                "marks": {m: sorted(getattr(value, m)) for m in _MARKS if hasattr(value, m)}}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_input_spec(v) for v in value]]
    if isinstance(value, dict):
        return {str(k): _input_spec(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return {"type": type(value).__name__, "repr": repr(value)}


# ---- helpers -------------------------------------------------------------------------------------------------
def _mark(args: tuple[Any, ...], dynamic: bool | Sequence[int]) -> None:
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() > 0]
    if dynamic is True:
        if tensors:
            tokens = tensors[0][1].shape[0]
            mark_token_dim(*(a for _, a in tensors if a.shape[0] == tokens))
        return
    if dynamic is False:
        return
    if isinstance(dynamic, (str, bytes)) or not isinstance(dynamic, Sequence):
        raise TypeError(f"precompile: dynamic must be True, False or a list of argument positions, got {dynamic!r}.")
    positions = dict(tensors)
    bad = [i for i in dynamic if i not in positions]
    if bad:
        raise ValueError(f"precompile: dynamic names argument positions {bad} that are not tensors with a dim 0 "
                         f"(tensor arguments: {sorted(positions)}).")
    mark_token_dim(*(positions[i] for i in dynamic))


def _artifact_dir(path: str | os.PathLike | None, backend: Backend) -> Path:
    if path is None:
        return backend.cache.root if backend.cache is not None else default_cache_dir()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"precompile: path must be a directory path, got {type(path).__name__}.")
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"precompile: path {str(root)!r} is a file; name a directory (compiles are saved inside).")
    return root


def _forward_globals(model: torch.nn.Module) -> dict[str, Any] | None:
    forward = inspect.unwrap(getattr(type(model).forward, "__func__", type(model).forward))
    return getattr(forward, "__globals__", None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__

