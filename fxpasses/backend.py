"""``fxpasses.Backend``: the object handed to ``torch.compile(model, backend=...)``.

Dynamo graph → ``aot_module_simplified`` (inference, input mutations kept in the graph as ``copy_``) → the
pipeline → either Inductor (the graph stays functional; our pipeline runs as Inductor's post-grad custom pass
and takes part in its FX-graph cache key) or defunctionalization and the FX graph run as is.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

from fxpasses import compat
from fxpasses import patterns as pattern_registry
from fxpasses.mapping import Mapping, cached_process_groups
from fxpasses.passes import Pass, PassContext, PipelineConfig, pass_name
from fxpasses.pattern_pass import split_patterns
from fxpasses.pipeline import build_pipeline
from fxpasses.plugins import enabled_by_default, load_plugins, plugin_pattern_names
from fxpasses.report import Report
from fxpasses.tokens import DEFAULT_TOKEN_INPUTS, TokenDim, find_token_dim
from fxpasses.user_passes import as_user_pass

log = logging.getLogger("fxpasses")



@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """Hash of fxpasses' own pass code, so editing a pass invalidates Inductor's cached graphs."""
    from fxpasses import ops, patterns

    h = hashlib.sha256()
    roots = [Path(__file__).resolve().parent, Path(ops.__file__).resolve().parent, Path(patterns.__file__).resolve().parent]
    for root in roots:  # installed, ops/ and patterns/ are inside fxpasses/: each file is hashed once
        for path in sorted(root.rglob("*.py")):
            if roots[0] != root and roots[0] in path.parents:
                continue
            h.update(path.relative_to(root.parent).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _pass_identity(p: Any) -> str:
    """A stable identity for a user pass: its own uuid() if it has one, else its name and source."""
    p = getattr(p, "original", p)  # a UserPass: identify what the user gave
    uuid = getattr(p, "uuid", None)
    if callable(uuid) and uuid() is not None:
        return f"{pass_name(p)}:{uuid()}"
    try:
        src = inspect.getsource(p if inspect.isfunction(p) or inspect.isclass(p) else type(p))
    except (OSError, TypeError):
        src = repr(p)
    return f"{pass_name(p)}:{hashlib.sha256(src.encode()).hexdigest()[:16]}"


class Backend:
    """A torch.compile backend running the fxpasses pipeline. One instance per model (it holds the report).

    Args:
        mapping: this rank's parallel layout (default: a single rank).
        inductor: hand the rewritten functional graph to Inductor instead of running the FX graph.
        inductor_config: Inductor options for that compile, e.g. ``{"triton.cudagraphs": True}`` (Inductor's own
            CUDA graphs, as ``mode="reduce-overhead"`` sets them).
        patterns: registered patterns (``patterns.Pattern`` objects or names) and/or pattern pass callables;
            default: every registered pattern that applies to the Mapping.
        extra_passes: user passes run after the patterns: ours ``(gm, ctx) -> PassResult``, torch's ``PassBase`` or
            ``(gm) -> PassResult``, or Inductor's ``CustomGraphPass`` ``(graph) -> None`` (see fxpasses.user_passes).
        strict: raise when a pass fails instead of rolling it back and recording the error.
        dump_dir: write each graph before and after the pipeline there, as readable Python.
        verify: run the verifier after every pass (default: the ``FXPASSES_VERIFY`` environment variable, off).
        token_inputs: input names that carry the token count, in order of preference.
        cuda_graph_sizes: token counts to capture piecewise CUDA graphs for (non-Inductor path, CUDA only); a
            batch is padded to the next size, larger ones run eagerly. A graph Dynamo specialized to one token
            count (1 token, its 0/1 rule) is captured at that count.
        splitting_ops: ops the graph is split at for CUDA graphs (they run eagerly on the real tokens), as
            ``namespace.name``. ``()`` captures each graph whole, attention included (fastest decode; needs every
            op that writes the KV cache to skip padded tokens, see ``ops.TOKEN_PADDING``).
        plugins: load patterns and passes from installed packages' entry points (fxpasses.plugins); default on
            unless ``FXPASSES_PLUGINS=0``. The report names what each plugin registered.
    """

    def __init__(
        self,
        mapping: Mapping | None = None,
        *,
        inductor: bool = False,
        inductor_config: dict[str, Any] | None = None,
        patterns: Sequence[Pass] | None = None,
        extra_passes: Sequence[Any] = (),
        strict: bool = False,
        dump_dir: str | os.PathLike | None = None,
        verify: bool | None = None,
        token_inputs: Sequence[str] = DEFAULT_TOKEN_INPUTS,
        cuda_graph_sizes: Sequence[int] | None = None,
        splitting_ops: Sequence[str] = ("fxp.attention",),
        plugins: bool | None = None,
    ) -> None:
        self.mapping = _checked_mapping(mapping)
        self.inductor = _checked_flag("inductor", inductor)
        self.inductor_config = _checked_inductor_config(inductor_config, self.inductor)
        self.cuda_graph_sizes = _checked_cuda_graph_sizes(cuda_graph_sizes, self.inductor)
        self.splitting_ops = _checked_op_names("splitting_ops", splitting_ops)
        self.token_inputs = _checked_names("token_inputs", token_inputs)
        self.dump_dir = _checked_dump_dir(dump_dir)
        self.config = PipelineConfig(strict=_checked_flag("strict", strict), defunctionalize=not self.inductor)
        if verify is not None:
            self.config.verify = _checked_flag("verify", verify)
        self.plugins = load_plugins() if _checked_flag("plugins", plugins, default=enabled_by_default()) else None
        self.extra_passes = [as_user_pass(p, f"Backend: extra_passes[{i}]") for i, p in enumerate(_checked_list(
            "extra_passes", extra_passes))] + list(self.plugins.passes if self.plugins else ())
        t0 = time.perf_counter()
        self.patterns = split_patterns(self._chosen_patterns(patterns), self.mapping, self.config, inductor=self.inductor)
        self.pattern_setup_seconds = time.perf_counter() - t0
        self.runners: list[Any] = []  # the CUDA-graph runners this backend made, one per graph
        # fxpasses.testing.warmup_cuda_graph_backend sets this to build runners on CPU (warm-up calls only)
        self.cuda_graph_warmup_only = False
        self.__name__ = "fxpasses"  # how torch.compile names this backend in its errors
        self.report = Report()
        if self.plugins:
            self.report.plugins.extend(self.plugins.records)
        self.token_dims: list[TokenDim | None] = []
        self._graphs = 0

    def _chosen_patterns(self, patterns: Sequence[Pass] | None) -> list[Any]:
        """What Backend(patterns=...) names; by default every registered pattern, less plugins' when they are off."""
        if patterns is not None:
            return _checked_list("patterns", patterns)
        excluded = frozenset() if self.plugins else plugin_pattern_names()
        return [p for p in pattern_registry.all() if p.name not in excluded]

    # ---- identity ----------------------------------------------------------------------------------------------
    def uuid(self) -> str:
        """Covers everything that changes what the pipeline does: our code, the Mapping, config, patterns, passes."""
        key = {
            "code": _source_digest(),
            "torch": torch.__version__,
            "mapping": self.mapping.to_dict(),
            "config": self.config.to_dict(),
            "patterns": [_pass_identity(p) for p in self.patterns],
            "extra_passes": [_pass_identity(p) for p in self.extra_passes],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    @property
    def token_dim(self) -> TokenDim | None:
        """The token dimension of the most recently compiled graph that has one."""
        return next((t for t in reversed(self.token_dims) if t is not None), None)

    # ---- the pipeline ------------------------------------------------------------------------------------------
    def context(self, fake_mode: Any = None) -> PassContext:
        groups = cached_process_groups(self.mapping)
        return PassContext(
            mapping=self.mapping,
            config=self.config,
            report=self.report,
            fake_mode=fake_mode,
            shape_env=getattr(fake_mode, "shape_env", None),
            tp_group_name=groups.tp.group_name if groups else None,
            pp_group_name=groups.pp.group_name if groups else None,
        )

    def run_pipeline(self, gm: torch.fx.GraphModule, graph_index: int, fake_mode: Any = None,
                     defunctionalize: bool = True) -> torch.fx.GraphModule:
        self._dump(gm, graph_index, "before")
        manager = build_pipeline(self.patterns, self.extra_passes, defunctionalize_after=defunctionalize)
        manager.run(gm, self.context(fake_mode), graph_index)
        self._dump(gm, graph_index, "after")
        return gm

    def _dump(self, gm: torch.fx.GraphModule, index: int, when: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.dump_dir / f"graph{index}_{when}.py"
        path.write_text(gm.print_readable(print_output=False))

    # ---- torch.compile entry -----------------------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        t0 = time.perf_counter()
        index = self._graphs
        self._graphs += 1
        self.report.graphs += 1
        self.token_dims.append(find_token_dim(gm, self.token_inputs))
        try:
            if self.inductor:
                return self._compile_inductor(gm, example_inputs, index)
            return compat.aot_module_simplified(
                gm,
                example_inputs,
                fw_compiler=functools.partial(self._fx_compiler, index=index),
                keep_inference_input_mutations=True,
            )
        finally:
            self.report.compile_seconds += time.perf_counter() - t0

    def _fx_compiler(self, gm: torch.fx.GraphModule, example_inputs: list[Any], index: int) -> Callable[..., Any]:
        self.run_pipeline(gm, index, compat.detect_fake_mode(example_inputs), defunctionalize=True)
        runner = self._cuda_graphs(gm, index)
        return runner if runner is not None else compat.make_boxed(gm.forward)

    def _cuda_graphs(self, gm: torch.fx.GraphModule, index: int) -> Any:
        """The CUDA-graph runner for this graph, or None (with a note in the report saying why)."""
        if not self.cuda_graph_sizes:
            return None
        token = self.token_dims[index]
        if token is None:
            self.report.note(f"graph {index}: no token input found, so no CUDA graphs (name it with token_inputs=...)")
            return None
        if not token.is_dynamic and int(token.expr) > self.cuda_graph_sizes[-1]:
            self.report.note(f"graph {index}: static token count {int(token.expr)} is above the largest CUDA-graph "
                             f"size {self.cuda_graph_sizes[-1]}; it runs without CUDA graphs")
            return None
        from fxpasses.cudagraphs import PiecewiseCudaGraphs

        runner = PiecewiseCudaGraphs(gm, token.expr, self.cuda_graph_sizes, self.splitting_ops,
                                     warmup_only=self.cuda_graph_warmup_only)
        self.runners.append(runner)
        return runner

    def _compile_inductor(self, gm: torch.fx.GraphModule, example_inputs: list[Any], index: int) -> Callable[..., Any]:
        custom = make_inductor_pass(self, index)
        hits, misses = compat.fx_graph_cache_counters()
        compiled = compat.inductor_compile(gm, example_inputs, {"post_grad_custom_pre_pass": custom, **self.inductor_config})
        new_hits, _ = compat.fx_graph_cache_counters()
        if new_hits > hits:
            self.report.note(f"graph {index}: served from Inductor's FX graph cache; the passes did not run again")
        return compiled


# ---- argument checks: each names the argument and says what to pass instead ------------------------------------
def _checked_mapping(mapping: Any) -> Mapping:
    if mapping is not None and not isinstance(mapping, Mapping):
        raise TypeError(f"Backend: mapping must be a fxpasses.Mapping, got {type(mapping).__name__} {mapping!r}; "
                        "build one with fxpasses.Mapping(world_size, rank, tp_size, pp_size) or Mapping.from_env().")
    return mapping or Mapping()


def _checked_flag(name: str, value: Any, default: bool | None = None) -> bool:
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"Backend: {name} must be True or False, got {type(value).__name__} {value!r}.")
    return value


def _checked_list(name: str, value: Any) -> list[Any]:
    """A sequence of items; one string is refused (it would be taken letter by letter)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"Backend: {name} must be a list, got {type(value).__name__} {value!r}"
                        + (f"; write {name}=[{value!r}]" if isinstance(value, str) else "") + ".")
    return list(value)


def _checked_names(name: str, value: Any) -> tuple[str, ...]:
    items = _checked_list(name, value)
    if not all(isinstance(v, str) and v for v in items):
        raise TypeError(f"Backend: {name} must be a list of non-empty strings, got {items!r}.")
    return tuple(items)


def _checked_op_names(name: str, value: Any) -> tuple[str, ...]:
    names = _checked_names(name, value)
    if any("." not in o for o in names):
        raise ValueError(f"Backend: {name} must be a list of op names as 'namespace.name' (e.g. "
                         f"'fxp.attention'), got {list(names)!r}.")
    return names


def _checked_inductor_config(options: Any, inductor: bool) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"Backend: inductor_config must be a dict of Inductor options, got {type(options).__name__}.")
    if options and not inductor:
        raise ValueError("Backend: inductor_config is for the Inductor path; pass inductor=True too.")
    unknown = sorted(set(options) - compat.inductor_option_names())
    if unknown:
        raise ValueError(f"Backend: unknown Inductor option(s) {unknown}; see torch._inductor.config "
                         "(dotted names, e.g. 'triton.cudagraphs').")
    return dict(options)


def _checked_cuda_graph_sizes(sizes: Any, inductor: bool) -> list[int] | None:
    if not sizes:
        return None
    sizes = _checked_list("cuda_graph_sizes", sizes)
    if inductor:
        raise ValueError("Backend: cuda_graph_sizes is for the non-Inductor path; with inductor=True use "
                         "torch.compile(mode='reduce-overhead') instead.")
    if not torch.cuda.is_available():
        raise ValueError("Backend: cuda_graph_sizes needs a CUDA device, and none is available here; "
                         "leave cuda_graph_sizes unset on CPU.")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"Backend: cuda_graph_sizes must be positive token counts, got {sizes}.")
    return sorted(set(sizes))


def _checked_dump_dir(dump_dir: Any) -> Path | None:
    """Checked now, not at the first compile: a dump directory that cannot be written fails with its name."""
    if dump_dir is None:
        return None
    if not isinstance(dump_dir, (str, os.PathLike)):
        raise TypeError(f"Backend: dump_dir must be a path (str or os.PathLike), got {type(dump_dir).__name__}.")
    path = Path(dump_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Backend: dump_dir {str(path)!r} is a file, not a directory; name a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"Backend: dump_dir {str(path)!r} cannot be created: {err.strerror}.") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"Backend: dump_dir {str(path)!r} is not writable; name a directory you can write to.")
    return path


def make_inductor_pass(backend: Backend, index: int) -> Any:
    """Our pipeline as Inductor's post-grad custom pass; its uuid() enters the FX-graph cache key."""
    base = compat.custom_graph_pass_base()

    class FxpassesInductorPass(base):  # type: ignore[misc, valid-type]
        def __call__(self, graph: torch.fx.Graph) -> None:
            gm = graph.owning_module
            backend.run_pipeline(gm, index, defunctionalize=False)

        def uuid(self) -> Any:
            return backend.uuid()

    return FxpassesInductorPass()


def fxpasses_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """``torch.compile(model, backend="fxpasses")``: a default Backend (single rank, no Inductor) per graph."""
    return Backend()(gm, example_inputs)


compat.register_dynamo_backend("fxpasses", fxpasses_backend)
