"""``fxpasses.Backend``: the object handed to ``torch.compile(model, backend=...)``.

Dynamo graph → ``aot_module_simplified`` (inference, input mutations kept in the graph as ``copy_``) → the
pipeline → either Inductor (the graph stays functional; our pipeline runs as Inductor's post-grad custom pass
and takes part in its FX-graph cache key) or defunctionalization and the FX graph run as is.

On the non-Inductor path the result is kept in fxpasses' on-disk compile cache (fxpasses.compile_cache, keyed by
fxpasses.cache_key): a restarted process serves the same Dynamo graph from it without tracing the patterns, AOT
autograd's trace or the pipeline (docs/caching.md).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import sympy
import torch
import torch.fx

from fxpasses import cache_key, compat
from fxpasses import patterns as pattern_registry
from fxpasses.cache_graph import (CachedGraph, PrecompileRefused, RuntimeSpec, SerializedGraph, dynamic_output_dims,
                                  mutated_inputs, refusal)
from fxpasses.compile_cache import CacheEvent, CacheStore, GraphEntry, ReportDelta, resolve_cache_dir
from fxpasses.mapping import Mapping, cached_process_groups
from fxpasses.passes import Pass, PassContext, PipelineConfig, pass_name
from fxpasses.pattern_pass import PatternRewritePass, split_patterns
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
        verify: run the full verifier (effects, ordering, buffer hazards) after every pass (default: the
            ``FXPASSES_VERIFY`` environment variable, off). The cheap checks (a well-formed acyclic graph, outputs'
            shape/dtype/stride, input writes kept) run after every pass regardless.
        token_inputs: input names that carry the token count, in order of preference.
        cuda_graph_sizes: token counts to capture piecewise CUDA graphs for (non-Inductor path, CUDA only); a
            batch is padded to the next size, larger ones run eagerly. A graph Dynamo specialized to one token
            count (1 token, its 0/1 rule) is captured at that count.
        splitting_ops: ops the graph is split at for CUDA graphs (they run eagerly on the real tokens), as
            ``namespace.name``. ``()`` captures each graph whole, attention included (fastest decode; needs every
            op that writes the KV cache to skip padded tokens, see ``ops.TOKEN_PADDING``).
        plugins: load patterns and passes from installed packages' entry points (fxpasses.plugins); default on
            unless ``FXPASSES_PLUGINS=0``. The report names what each plugin registered.
        cache: the on-disk compile cache of the non-Inductor path: a directory, True (``FXPASSES_CACHE_DIR``, else
            ``$XDG_CACHE_HOME/fxpasses`` or ``~/.cache/fxpasses``) or False; default on unless
            ``FXPASSES_CACHE=0``. ``cache_events`` and the report say, per graph, hit or miss and why.
            A hit runs none of the passes (a user pass with side effects does not run again); patterns are traced
            only when a graph misses. The Inductor path uses Inductor's own caches, our uuid() in their key.
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
        cache: bool | str | os.PathLike | None = None,
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
        cache_dir = resolve_cache_dir(cache)
        self.cache = CacheStore(cache_dir) if cache_dir is not None and not self.inductor else None
        self.cache_events: list[CacheEvent] = []
        self._pattern_items = _checked_pattern_items(self._chosen_patterns(patterns))
        self._patterns: list[Any] | None = None
        if self.cache is None:  # without the cache every graph runs the pipeline: trace now, as always
            self._trace_patterns()
        self.runners: list[Any] = []  # the CUDA-graph runners this backend made, one per graph
        # fxpasses.testing.warmup_cuda_graph_backend sets this to build runners on CPU (warm-up calls only)
        self.cuda_graph_warmup_only = False
        self.__name__ = "fxpasses"  # how torch.compile names this backend in its errors
        self.report = Report()
        if self.plugins:
            self.report.plugins.extend(self.plugins.records)
        self.token_dims: list[TokenDim | None] = []  # one per graph this Backend compiled or adopted
        self._identity: dict[str, Any] | None = None  # the backend's half of the cache key, computed once

    def _chosen_patterns(self, patterns: Sequence[Pass] | None) -> list[Any]:
        """What Backend(patterns=...) names; by default every registered pattern, less plugins' when they are off."""
        if patterns is not None:
            return _checked_list("patterns", patterns)
        excluded = frozenset() if self.plugins else plugin_pattern_names()
        return [p for p in pattern_registry.all() if p.name not in excluded]

    @property
    def patterns(self) -> list[Any]:
        """The pattern passes, traced on first use (with the cache on, a process whose graphs all hit never traces)."""
        if self._patterns is None:
            self._trace_patterns()
        return self._patterns  # type: ignore[return-value]

    def _trace_patterns(self) -> None:
        self._patterns = split_patterns(self._pattern_items, self.mapping, self.config, inductor=self.inductor)

    @property
    def pattern_setup_seconds(self) -> float:
        """Seconds this backend spent tracing pattern spellings (0 where every graph hit the compile cache); a
        pattern that ``needs`` something of the graph is traced when a graph first has it."""
        return sum(p.pattern_set.setup_seconds for p in self._patterns or () if isinstance(p, PatternRewritePass))

    # ---- identity ----------------------------------------------------------------------------------------------
    def cache_identity(self) -> dict[str, Any]:
        """The backend's half of the compile-cache key (fxpasses.cache_key), known without tracing a pattern.

        Raises cache_key.Unidentifiable for a pass whose behaviour cannot be captured (state and no uuid())."""
        groups = cached_process_groups(self.mapping)
        items = [cache_key.pattern_identity(p) if isinstance(p, pattern_registry.Pattern)
                 else cache_key.callable_identity(p, f"patterns item {pass_name(p)!r}") for p in self._pattern_items]
        return {
            "code": _source_digest(),
            "torch": torch.__version__,
            "mapping": self.mapping.to_dict(),
            "groups": [groups.tp.group_name, groups.pp.group_name] if groups else None,
            "config": self.config.to_dict(),
            "patterns": items,
            "extra_passes": [cache_key.callable_identity(p, f"extra pass {pass_name(getattr(p, 'original', p))!r}")
                             for p in self.extra_passes],
        }

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

    def _new_graph(self, token: TokenDim | None) -> int:
        """Number the next graph (compiled or adopted) and record its token dimension."""
        self.token_dims.append(token)
        self.report.graphs += 1
        return len(self.token_dims) - 1

    # ---- torch.compile entry -----------------------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        t0 = time.perf_counter()
        index = self._new_graph(find_token_dim(gm, self.token_inputs))
        try:
            if self.inductor:
                return self._compile_inductor(gm, example_inputs, index)
            return self._compile_fx(gm, example_inputs, index)
        finally:
            self.report.compile_seconds += time.perf_counter() - t0

    def _compile_fx(self, gm: torch.fx.GraphModule, example_inputs: list[Any], index: int) -> Callable[..., Any]:
        """AOT autograd and the pipeline, or the compile cache's entry for this graph."""
        return self._compile_fx_entry(gm, example_inputs, index, need_entry=False)[0]

    def _compile_fx_entry(self, gm: torch.fx.GraphModule, example_inputs: list[Any], index: int,
                          need_entry: bool) -> tuple[Callable[..., Any], GraphEntry | None, str]:
        """The compiled graph, its self-contained entry (served from the cache or captured now; None when the graph
        cannot be served without AOT's wrappers) and why there is no entry. ``need_entry`` captures one even with
        the cache off (fxpasses.precompile saves it with Dynamo's artifact)."""
        key, why_not = self._cache_key(gm, example_inputs)
        if key is not None:
            t0 = time.perf_counter()
            entry, why_not = self.cache.load(key)  # type: ignore[union-attr]
            if entry is not None:
                served = self._serve(entry, index)
                if isinstance(served, str):
                    why_not = served
                else:
                    self._cache_event(CacheEvent(index, True, "served from the compile cache", key,
                                                 seconds=time.perf_counter() - t0))
                    return served, entry, "hit"
        capture = _Capture() if key is not None or need_entry else None
        before = len(self.report.passes), dict(self.report.matches), len(self.report.near_misses), len(self.report.notes)
        facts = compat.shape_env_facts(getattr(compat.detect_fake_mode(example_inputs), "shape_env", None))
        compiled = compat.aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=functools.partial(self._fx_compiler, index=index, capture=capture),
            keep_inference_input_mutations=True,
        )
        if capture is None:
            self._cache_event(CacheEvent(index, False, why_not))
            return compiled, None, why_not
        t0 = time.perf_counter()
        refused = capture.refused or refusal(capture.meta, capture.graph_inputs, len(example_inputs))
        if refused is None and compat.shape_env_facts(
                getattr(compat.detect_fake_mode(example_inputs), "shape_env", None)) != facts:
            refused = "AOT autograd or a pass added shape guards, which a cache hit would not install"
        if refused is not None:
            self._cache_event(CacheEvent(index, False, f"{why_not}; not stored: {refused}", key))
            return compiled, None, refused
        entry = GraphEntry(key=key or "", graph=capture.graph, has_values=bool(self.cuda_graph_sizes),
                           mutated_inputs=mutated_inputs(capture.meta),
                           dynamic_output_dims=dynamic_output_dims(capture.meta),
                           report=self._report_delta(before, index), torch_version=torch.__version__)
        if key is None:
            self._cache_event(CacheEvent(index, False, why_not))
            return compiled, entry, ""
        failed = self.cache.store(entry)  # type: ignore[union-attr]
        self._cache_event(CacheEvent(index, False, why_not + (f"; not stored: {failed}" if failed else ""), key,
                                     stored=failed is None, seconds=time.perf_counter() - t0))
        return compiled, entry, ""

    # ---- fxpasses.precompile: results Dynamo's AOT compile can save and load -------------------------------------
    def compile_serializable(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> SerializedGraph:
        """This Backend as the backend of Dynamo's AOT compile (fxpasses.precompile): the graph compiled as
        ``__call__`` would (the compile cache included), returned as a ``SerializedGraph`` that can be saved.

        Raises PrecompileRefused when the graph cannot be served without AOT autograd's runtime wrappers (see
        cache_graph.refusal) or the Backend uses Inductor: the caller then compiles normally."""
        if self.inductor:
            raise PrecompileRefused("inductor=True: Inductor's result is not one fxpasses can save (use Inductor's "
                                    "own caches)")
        t0 = time.perf_counter()
        token = find_token_dim(gm, self.token_inputs)
        index = self._new_graph(token)
        try:
            with compat.plain_autograd_cache():
                compiled, entry, why = self._compile_fx_entry(gm, example_inputs, index, need_entry=True)
        finally:
            self.report.compile_seconds += time.perf_counter() - t0
        if entry is None:
            raise PrecompileRefused(f"graph {index} cannot be served without AOT autograd's wrappers: {why}")
        spec = RuntimeSpec(tuple(self.cuda_graph_sizes) if self.cuda_graph_sizes else None, self.splitting_ops,
                           token.input_index if token is not None else None)
        return SerializedGraph(entry, spec, run=compiled)

    def adopt_serialized(self, graph: SerializedGraph) -> None:
        """Bind a loaded ``SerializedGraph`` to this Backend: its report replayed here, its runner (CUDA graphs,
        captured lazily) built with this Backend's settings."""
        index = self._new_graph(None)  # its token dimension is found once the graph is loaded

        def runner(gm: torch.fx.GraphModule) -> Any:
            self.token_dims[index] = _token_of_graph(gm, graph.spec.token_input)
            return self._cuda_graphs(gm, index)

        graph.build(runner)
        self._replay(graph.entry.report, index)

    def _fx_compiler(self, gm: torch.fx.GraphModule, example_inputs: list[Any], index: int,
                     capture: "_Capture | None" = None) -> Callable[..., Any]:
        self.run_pipeline(gm, index, compat.detect_fake_mode(example_inputs), defunctionalize=True)
        if capture is not None:  # before the CUDA-graph runner takes the graph apart
            capture.meta = compat.aot_forward_metadata()
            capture.graph_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
            if any(r.error for r in self.report.passes if r.graph == index):
                capture.refused = "a pass failed and was rolled back (compiled again next time)"
            else:
                try:
                    if self.cuda_graph_sizes:  # the runner's values only (fxpasses.cudagraphs.nodes_the_runner_reads)
                        from fxpasses.cudagraphs import nodes_the_runner_reads

                        capture.graph = compat.pickle_graph_module_values(
                            gm, nodes_the_runner_reads(gm, self.splitting_ops))
                    else:
                        capture.graph = compat.pickle_graph_module(gm, keep_values=False)
                except Exception as err:  # noqa: BLE001  (a graph holding something GraphPickler refuses)
                    capture.refused = f"the graph does not serialize ({type(err).__name__}: {err})"
        runner = self._cuda_graphs(gm, index)
        return runner if runner is not None else compat.make_boxed(gm.forward)

    # ---- the compile cache -------------------------------------------------------------------------------------
    def _cache_key(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> tuple[str | None, str]:
        """This graph's cache key, or None and why the cache is not used for it."""
        if self.cache is None:
            return None, "the compile cache is off"
        if self.dump_dir is not None:
            return None, "dump_dir is set (the pipeline runs to write the dumps)"
        if type(self).run_pipeline is not Backend.run_pipeline:  # e.g. testing.RecordingBackend: it watches the passes
            return None, f"{type(self).__name__} overrides run_pipeline (it must see every graph)"
        try:
            if self._identity is None:
                self._identity = self.cache_identity()
            graph = cache_key.describe_graph(gm, example_inputs)
        except cache_key.Unidentifiable as err:
            return None, str(err)
        except Exception as err:  # noqa: BLE001  (never a crash: an input the description does not know is a miss)
            log.warning("fxpasses compile cache: no key for this graph: %s: %s", type(err).__name__, err)
            return None, f"no key for this graph ({type(err).__name__}: {err})"
        key = cache_key.graph_key(self._identity, graph, cache_key.global_state(), bool(self.cuda_graph_sizes))
        return key, "no entry for this key"

    def _serve(self, entry: GraphEntry, index: int) -> Callable[..., Any] | str:
        """The compiled callable for a cache entry, or why it cannot serve (then it is a miss)."""
        try:
            gm = compat.unpickle_graph_module(entry.graph)
        except Exception as err:  # noqa: BLE001
            return f"entry does not load ({type(err).__name__}), ignored"
        runner = self._cuda_graphs(gm, index)
        self._replay(entry.report, index)
        return CachedGraph(runner if runner is not None else compat.make_boxed(gm.forward), entry.mutated_inputs,
                           entry.dynamic_output_dims)

    def _replay(self, delta: ReportDelta, index: int) -> None:
        """A cached graph's matches, pass records, near misses and notes, added to this Backend's report."""
        for record in delta.passes:
            record = copy.copy(record)
            record.graph = index
            self.report.passes.append(record)
        self.report.add_matches(delta.matches)
        self.report.near_misses.extend(delta.near_misses)
        self.report.notes.extend(delta.notes)

    def _report_delta(self, before: tuple[int, dict[str, int], int, int], index: int) -> ReportDelta:
        passes, matches, near, notes = before
        return ReportDelta(
            matches={k: v - matches.get(k, 0) for k, v in self.report.matches.items() if v != matches.get(k, 0)},
            passes=[r for r in self.report.passes[passes:] if r.graph == index],
            near_misses=list(self.report.near_misses[near:]),
            notes=list(self.report.notes[notes:]),
        )

    def _cache_event(self, event: CacheEvent) -> None:
        self.cache_events.append(event)
        self.report.note(str(event))
        log.info("%s", event)

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
        if runner.compile_ahead is not None:
            runner.compile_ahead.on_done = lambda result: self.report.note(f"graph {index}: {result}")
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


def _token_of_graph(gm: torch.fx.GraphModule, input_index: int | None) -> TokenDim | None:
    """The token dimension of a loaded graph: dim 0 of its input ``input_index`` (kept from the Dynamo graph)."""
    if input_index is None:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if input_index >= len(placeholders):
        return None
    node = placeholders[input_index]
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    size = val.shape[0]
    expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
    symints = tuple(i for i, n in enumerate(placeholders) if isinstance(n.meta.get("val"), torch.SymInt)
                    and not expr.is_number and n.meta["val"].node.expr == expr)
    return TokenDim(node.name, node.name, input_index, expr, compat.symint_hint(size), symints)


class _Capture:
    """What the compiler saw of one graph, for the compile cache: AOT's metadata and the post-pipeline graph."""

    def __init__(self) -> None:
        self.meta: Any = None
        self.graph: bytes = b""
        self.graph_inputs = -1
        self.refused: str | None = None


# ---- argument checks: each names the argument and says what to pass instead ------------------------------------
def _checked_pattern_items(items: list[Any]) -> list[Any]:
    """Backend(patterns=...) items, checked now though they are traced later: names must be registered."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(pattern_registry.get(item))
        elif isinstance(item, pattern_registry.Pattern) or callable(item):
            out.append(item)
        else:
            raise TypeError(f"Backend: patterns item {item!r} is neither a Pattern, a pattern name nor a pass "
                            "callable.")
    return out


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
