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
from typing import Any, Callable, Sequence

import torch
import torch.fx

from fxpasses import compat
from fxpasses.mapping import Mapping, cached_process_groups
from fxpasses.passes import Pass, PassContext, PipelineConfig, pass_name
from fxpasses.pattern_pass import split_patterns
from fxpasses.pipeline import build_pipeline
from fxpasses.report import Report
from fxpasses.tokens import DEFAULT_TOKEN_INPUTS, TokenDim, find_token_dim

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
    if hasattr(p, "uuid") and callable(p.uuid):
        return f"{pass_name(p)}:{p.uuid()}"
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
        extra_passes: user passes ``(gm, ctx) -> PassResult`` run after the patterns.
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
    """

    def __init__(
        self,
        mapping: Mapping | None = None,
        *,
        inductor: bool = False,
        inductor_config: dict[str, Any] | None = None,
        patterns: Sequence[Pass] | None = None,
        extra_passes: Sequence[Pass] = (),
        strict: bool = False,
        dump_dir: str | os.PathLike | None = None,
        verify: bool | None = None,
        token_inputs: Sequence[str] = DEFAULT_TOKEN_INPUTS,
        cuda_graph_sizes: Sequence[int] | None = None,
        splitting_ops: Sequence[str] = ("fxp.attention",),
    ) -> None:
        if mapping is not None and not isinstance(mapping, Mapping):
            raise TypeError(f"Backend: mapping must be a fxpasses.Mapping, got {type(mapping).__name__}.")
        if cuda_graph_sizes:
            if inductor:
                raise ValueError("Backend: cuda_graph_sizes is for the non-Inductor path; with inductor=True use "
                                 "torch.compile(mode='reduce-overhead') instead.")
            if not torch.cuda.is_available():
                raise ValueError("Backend: cuda_graph_sizes needs a CUDA device, and none is available here; "
                                 "leave cuda_graph_sizes unset on CPU.")
            if any(int(s) < 1 for s in cuda_graph_sizes):
                raise ValueError(f"Backend: cuda_graph_sizes must be positive token counts, got {list(cuda_graph_sizes)}.")
        if inductor_config and not inductor:
            raise ValueError("Backend: inductor_config is for the Inductor path; pass inductor=True too.")
        self.inductor_config = dict(inductor_config or {})
        if self.inductor_config:
            unknown = sorted(set(self.inductor_config) - compat.inductor_option_names())
            if unknown:
                raise ValueError(f"Backend: unknown Inductor option(s) {unknown}; see torch._inductor.config "
                                 "(dotted names, e.g. 'triton.cudagraphs').")
        self.cuda_graph_sizes = sorted(set(int(s) for s in cuda_graph_sizes)) if cuda_graph_sizes else None
        if isinstance(splitting_ops, str) or any(not isinstance(o, str) or "." not in o for o in splitting_ops):
            raise ValueError(f"Backend: splitting_ops must be a list of op names as 'namespace.name' (e.g. "
                             f"'fxp.attention'), got {splitting_ops!r}.")
        self.splitting_ops = tuple(splitting_ops)
        self.runners: list[Any] = []  # the piecewise CUDA-graph runners this backend made, one per graph
        self.mapping = mapping or Mapping()
        self.inductor = inductor
        self.extra_passes = list(extra_passes)
        self.config = PipelineConfig(strict=strict, defunctionalize=not inductor)
        if verify is not None:
            self.config.verify = verify
        t0 = time.perf_counter()
        self.patterns = split_patterns(patterns, self.mapping, self.config, inductor=inductor)
        self.pattern_setup_seconds = time.perf_counter() - t0
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.token_inputs = tuple(token_inputs)
        self.__name__ = "fxpasses"  # how torch.compile names this backend in its errors
        self.report = Report()
        self.token_dims: list[TokenDim | None] = []
        self._graphs = 0

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

        runner = PiecewiseCudaGraphs(gm, token.expr, self.cuda_graph_sizes, self.splitting_ops)
        runner._boxed_call = True  # AOT passes a list of inputs
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
