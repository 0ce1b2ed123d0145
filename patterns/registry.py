"""Patterns as data, registered in one place, applied by one driver to a fixed point (MLIR's model).

A :class:`Pattern` has a public name (what reports say), a benefit (larger fusions first), its *spellings* (plain
torch functions computing the same thing; the registry traces each for every dtype in ``trace_dtypes`` and keeps
the distinct graphs), a replacement, checks that a structural match must pass, an applicability predicate over
the Mapping and config, and a hint saying which nodes look like the root of this pattern (for near-miss
explanations). ``register`` adds a pattern to the registry; ``patterns.all()`` lists them.

``PatternSet`` is what one Backend owns: the patterns that apply to its Mapping, with their traced graphs. Traced
graphs do not depend on the Mapping, so they are cached per process; nothing Mapping-dependent is.
"""
from __future__ import annotations

import functools
import logging
import operator
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

from fxpasses import compat
from fxpasses.patterns.matcher import Match, MatchFailure, PatternGraph, PatternTraceError, match, trace_pattern

log = logging.getLogger("fxpasses.patterns")


@dataclass(frozen=True)
class MatchContext:
    """What checks and predicates may read: the Mapping (duck-typed: tp_size, ...), config, group names."""

    mapping: Any = None
    config: Any = None
    tp_group_name: str | None = None
    pp_group_name: str | None = None


# A check returns the reason it fails, or None. A check may also widen the Match it passes (add nodes, rebind
# inputs, name more outputs: patterns/linear.py's N-D checks take the views a traced spelling cannot name); the
# driver replaces ``m.pattern.outputs`` and erases only the matched nodes left without readers, so a widened
# Match is rewritten by the same rules as a traced one.
Check = Callable[[Match, MatchContext], "str | None"]


@dataclass(frozen=True)
class Pattern:
    name: str
    benefit: int
    spellings: Callable[[], Sequence[Callable[..., Any]]]
    input_names: tuple[str, ...]
    example_inputs: Callable[[torch.dtype], tuple]
    replace: Callable[..., Any]  # (builder, **bindings) -> node or tuple of nodes, one per pattern output
    checks: tuple[Check, ...] = ()
    applies: Callable[[Any, Any], bool] = lambda mapping, config: True
    applies_doc: str = "always"
    hint: Callable[[torch.fx.Node], bool] | None = None
    trace_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    doc: str = ""
    # Report its hinted nodes as near misses when ``applies`` is false. Off for patterns that are off on purpose in
    # some configurations (the elementwise ones under Inductor), where there is nothing for a user to fix.
    explain_when_off: bool = True
    # Why a hinted node reached by no spelling cannot match (None: the generic "register a spelling" advice).
    explain: Callable[[torch.fx.Node], "str | None"] | None = None
    # A cheap fact about the whole graph that every match implies ("it holds a CUDA tensor", "a float8 value"):
    # a graph without it is not searched for this pattern, and the pattern's spellings are traced only when a
    # graph first has it (tracing is most of a first compile's pattern cost: the CUDA-only projection patterns
    # are over half of it, and a CPU graph can never hold their match). None: every graph is searched. Must be
    # implied by every match (tests/test_pattern_needs.py compiles with needs on and off and compares). Its
    # docstring says what it needs.
    needs: Callable[[torch.fx.Graph], bool] | None = None


# ---- cheap graph facts for ``Pattern.needs`` -------------------------------------------------------------------
FLOAT8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                        "float8_e5m2fnuz") if hasattr(torch, name))


def _tensor_values(graph: torch.fx.Graph) -> Iterable[torch.Tensor]:
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            yield val
        elif isinstance(val, (list, tuple)):
            yield from (v for v in val if isinstance(v, torch.Tensor))


def holds_cuda_tensor(graph: torch.fx.Graph) -> bool:
    """Whether any value of ``graph`` is a CUDA tensor (patterns whose checks want CUDA operands)."""
    return any(v.device.type == "cuda" for v in _tensor_values(graph))


def holds_float8(graph: torch.fx.Graph) -> bool:
    """Whether any value of ``graph`` is a float8 tensor (the fp8 quantization patterns produce one)."""
    return any(v.dtype in FLOAT8_DTYPES for v in _tensor_values(graph))


_REGISTRY: dict[str, Pattern] = {}


def register(pattern: Pattern) -> Pattern:
    if pattern.name in _REGISTRY:
        raise ValueError(f"a pattern named {pattern.name!r} is already registered; pick another name.")
    _REGISTRY[pattern.name] = pattern
    return pattern


def pattern(**fields: Any) -> Callable[[Callable[..., Any]], Pattern]:
    """Decorator form of ``register``: decorate the replacement; the other fields are Pattern's.

        @pattern(name="rms_norm", benefit=10, spellings=..., input_names=("x", "weight", "eps"), example_inputs=...)
        def rms_norm(b, x, weight, eps, **_):
            return b.call(torch.ops.fxp.rms_norm.default, x, weight, eps)
    """

    def decorate(replace: Callable[..., Any]) -> Pattern:
        return register(Pattern(replace=replace, doc=fields.pop("doc", None) or (replace.__doc__ or "").strip(),
                                **fields))

    return decorate


def all_patterns() -> list[Pattern]:
    """Every registered pattern, largest benefit first."""
    return sorted(_REGISTRY.values(), key=lambda p: (-p.benefit, p.name))


def get(name: str) -> Pattern:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no pattern named {name!r}; registered: {sorted(_REGISTRY)}") from None


@dataclass(frozen=True)
class Decompositions:
    """A named decomposition table the patterns are traced with (the name keys the trace cache)."""

    name: str
    table: Any = field(compare=False, hash=False, default=None)


def traced_variants(pattern: "Pattern | str", decompositions: Decompositions | None = None) -> tuple[PatternGraph, ...]:
    """The distinct graphs of a pattern's spellings over its trace dtypes, traced with ``decompositions`` (cached:
    they depend on nothing else)."""
    return _trace(get(pattern) if isinstance(pattern, str) else pattern, decompositions)


@functools.lru_cache(maxsize=None)
def _trace(pattern: Pattern, decompositions: Decompositions | None) -> tuple[PatternGraph, ...]:
    table = decompositions.table if decompositions is not None else None
    seen: dict[str, PatternGraph] = {}
    # first need may come inside a compile (a pattern traced when a graph first has what it ``needs``, a check
    # matching a sub-pattern): its symbolic sizes must not land in that compile's ShapeEnv
    with compat.outside_tracing():
        for spelling in pattern.spellings():
            for dtype in pattern.trace_dtypes:
                try:
                    graph = trace_pattern(spelling, pattern.example_inputs(dtype), pattern.input_names, table)
                except PatternTraceError as err:
                    log.warning("pattern %s: a spelling is skipped: %s", pattern.name, err)
                    continue
                seen.setdefault(graph.signature(), graph)
    return tuple(seen.values())


# ---- building replacements -----------------------------------------------------------------------------------
class Builder:
    """Inserts replacement nodes and gives them ``meta['val']`` by running the op on the inputs' fake values."""

    def __init__(self, graph: torch.fx.Graph, meta: dict[str, Any]) -> None:
        self.graph = graph
        self.meta = {k: meta[k] for k in ("stack_trace", "nn_module_stack") if k in meta}
        self.created: list[torch.fx.Node] = []

    def call(self, op: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = self.graph.call_function(op, tuple(args), kwargs)
        node.meta.update(self.meta)
        vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in args]
        mode = compat.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        if mode is not None:
            with mode:
                node.meta["val"] = op(*vals, **kwargs)
        self.created.append(node)
        return node

    def getitem(self, node: torch.fx.Node, index: int) -> torch.fx.Node:
        item = self.graph.call_function(operator.getitem, (node, index))
        item.meta.update(self.meta)
        if isinstance(node.meta.get("val"), (tuple, list)):
            item.meta["val"] = node.meta["val"][index]
        self.created.append(item)
        return item

    def outputs(self, node: torch.fx.Node, n: int) -> tuple[torch.fx.Node, ...]:
        return tuple(self.getitem(node, i) for i in range(n))


# ---- the driver ----------------------------------------------------------------------------------------------
@dataclass
class NearMiss:
    node: str  # the node that looked like the root of a pattern
    pattern: str  # the pattern that came closest
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.pattern} did not apply: {self.reason}"


@dataclass
class ApplyResult:
    counts: dict[str, int] = field(default_factory=dict)
    near_misses: list[NearMiss] = field(default_factory=list)
    rounds: int = 0


@dataclass
class _Attempt:
    pattern: str
    reason: str
    reached: int
    nodes: frozenset


class PatternSet:
    """The patterns one pipeline applies: those whose predicate holds for this Mapping and config."""

    def __init__(self, patterns: Iterable[Pattern], mapping: Any = None, config: Any = None,
                 decompositions: Decompositions | None = None) -> None:
        chosen = sorted(patterns, key=lambda p: (-p.benefit, p.name))
        self.active = [p for p in chosen if p.applies(mapping, config)]
        self.inactive = [p for p in chosen if p not in self.active]
        self.decompositions = decompositions
        self.variants: dict[str, tuple[PatternGraph, ...]] = {}
        self.setup_seconds = 0.0  # tracing spellings, now and on first need
        for p in self.active:
            if p.needs is None:
                self._traced(p)

    def _traced(self, p: Pattern) -> tuple[PatternGraph, ...]:
        if p.name not in self.variants:
            t0 = time.perf_counter()
            self.variants[p.name] = traced_variants(p, self.decompositions)
            self.setup_seconds += time.perf_counter() - t0
        return self.variants[p.name]

    def searched(self, graph: torch.fx.Graph) -> list[Pattern]:
        """The active patterns ``graph`` could hold a match of (``Pattern.needs``), largest benefit first, each
        with its spellings traced."""
        facts: dict[Callable[[torch.fx.Graph], bool], bool] = {}  # one scan per fact, however many need it
        for p in self.active:
            if p.needs is not None and p.needs not in facts:
                facts[p.needs] = p.needs(graph)
        out = [p for p in self.active if p.needs is None or facts[p.needs]]
        for p in out:
            self._traced(p)
        return out

    def names(self) -> list[str]:
        return [p.name for p in self.active]

    def identity(self) -> list[str]:
        """Names and traced structure of every variant: changes whenever what the set matches changes."""
        return [f"{p.name}:{p.benefit}:" + "|".join(v.signature() for v in self._traced(p)) for p in self.active] + [
            f"decompositions:{self.decompositions.name if self.decompositions else None}"]

    def apply(self, gm: torch.fx.GraphModule, ctx: MatchContext, max_rounds: int = 8) -> ApplyResult:
        """Apply every pattern, bottom-up, largest benefit first at each anchor, until nothing matches."""
        result = ApplyResult()
        attempts: dict[torch.fx.Node, list[_Attempt]] = defaultdict(list)
        graph = gm.graph
        searched = self.searched(graph)
        by_anchor: dict[Any, list[tuple[Pattern, PatternGraph]]] = defaultdict(list)
        for p in searched:
            for v in self.variants[p.name]:
                by_anchor[v.anchor.target].append((p, v))
        for _ in range(max_rounds):
            result.rounds += 1
            changed = False
            erased: set[torch.fx.Node] = set()
            nodes = list(graph.nodes)
            position = {n: i for i, n in enumerate(nodes)}  # nodes made this round sort first (-1): the
            for node in reversed(nodes):  # bottom-up walk never matches above a replacement it made

                if node in erased or node.op != "call_function":
                    continue
                for pattern, variant in by_anchor.get(node.target, ()):
                    try:
                        m = match(variant, node)
                        for check in pattern.checks:
                            reason = check(m, ctx)
                            if reason:
                                raise MatchFailure(reason, len(m.nodes) + 1, m.graph_nodes)
                    except MatchFailure as failure:
                        if failure.reached >= 3:
                            attempts[node].append(_Attempt(pattern.name, failure.reason, failure.reached, failure.nodes))
                        continue
                    erased.update(self._rewrite(graph, pattern, m, lambda n: position.get(n, -1)))
                    result.counts[pattern.name] = result.counts.get(pattern.name, 0) + 1
                    changed = True
                    break
            if not changed:
                break
        result.near_misses = self._explain(graph, attempts, searched)
        return result

    def _rewrite(self, graph: torch.fx.Graph, pattern: Pattern, m: Match,
                 position: Callable[[torch.fx.Node], int]) -> set[torch.fx.Node]:
        outputs = [m.node(o) for o in m.pattern.outputs]
        first = min(outputs, key=position)
        inputs = [v for v in m.bindings.values() if isinstance(v, torch.fx.Node)]
        where = first if all(position(i) < position(first) for i in inputs) else m.anchor
        with graph.inserting_before(where):
            builder = Builder(graph, m.anchor.meta)
            new = pattern.replace(builder, **m.bindings)
        new = new if isinstance(new, tuple) else (new,)
        for old, repl in zip(outputs, new):
            old.replace_all_uses_with(repl)
        erased = set()
        for g in sorted(m.graph_nodes, key=position, reverse=True):
            if not g.users:
                graph.erase_node(g)
                erased.add(g)
        return erased

    def _explain(self, graph: torch.fx.Graph, attempts: dict[torch.fx.Node, list[_Attempt]],
                 searched: list[Pattern]) -> list[NearMiss]:
        """Near misses for hinted nodes. A pattern the graph cannot hold (``needs``) explains nothing: its hint
        would only say that no spelling reached a node it could never match."""
        out: list[NearMiss] = []
        hinted = [(p, h) for p in searched + [q for q in self.inactive if q.explain_when_off]
                  if (h := p.hint) is not None]
        for node in graph.nodes:
            families = [p for p, h in hinted if h(node)]
            if not families:
                continue
            inactive = [p for p in families if p in self.inactive]
            best: _Attempt | None = None
            for tries in attempts.values():  # the anchor may be gone (a smaller pattern took it); the node is not
                for a in tries:
                    if node.name in a.nodes and (best is None or a.reached > best.reached):
                        best = a
            if best is not None:
                out.append(NearMiss(node.name, best.pattern, best.reason))
            elif inactive and not any(p in self.active for p in families):
                p = inactive[0]
                out.append(NearMiss(node.name, p.name, f"the pattern is off for this configuration (needs {p.applies_doc})"))
            elif families:
                why = families[0].explain(node) if families[0].explain is not None else None
                out.append(NearMiss(node.name, families[0].name, why or (
                    f"no spelling of {families[0].name} reached {_describe(node)}: the computation around it "
                    "has a different structure (register a spelling for it)")))
        return out


def _describe(node: torch.fx.Node) -> str:
    return f"{node.target} ({node.name})"
