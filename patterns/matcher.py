"""A small graph-pattern matcher that can say why it did not match.

A pattern is a plain torch function (a *spelling*), traced once by the running torch's AOT autograd into a small
functional ATen graph (exactly how the graphs we match are made), then turned into our own ``PNode`` tree: the pattern follows whatever ATen the running torch
produces, while matching, commutativity and explanations are ours. Constants that vary between call sites become
wildcards bound at match time: epsilon (traced with a sentinel value), the reduction dims, the cast-back dtype,
device/layout keywords, process-group names, a size (traced as ``SIZE_SENTINEL``: e.g. half a head dimension) and
the dimension that ops such as split, slice and cat work along.

Matching is anchored at a graph node and walks producers, binding pattern nodes to graph nodes one to one; ``add``
and ``mul`` (and ops declared commutative) are tried in both operand orders. Internal pattern nodes may have no
users outside the match. Every failure records how far it got and why, in words a user can act on.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx

from fxpasses import compat

aten = torch.ops.aten

EPS_SENTINEL = 1.2345678e-5  # traced in place of epsilon; any float this close becomes the "eps" wildcard
GROUP_SENTINEL = "__fxpasses_group__"
SIZE_SENTINEL = 37  # traced in place of a size that varies between call sites; any int equal to it becomes "size"
TRACE_LOW_DTYPE = torch.bfloat16  # the dtype low-precision spellings are traced with; its literals become "dtype"

# Operand pairs whose order does not change the result.
COMMUTATIVE: dict[Any, tuple[int, int]] = {aten.add.Tensor: (0, 1), aten.mul.Tensor: (0, 1)}
_REDUCE_DIM_OPS = {aten.mean.dim, aten.sum.dim_IntList}
# Ops whose ``dim`` argument becomes the "dim" wildcard (a pattern's check says which dims it accepts).
_SHAPE_DIM_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.cat.default,
                  aten.chunk.default}


@dataclass(frozen=True)
class Wildcard:
    name: str
    kind: str  # tensor | scalar | dtype | dims | str | any


@dataclass(eq=False)
class PNode:
    """One node of a pattern: an op with arguments, or (``target is None``) a tensor wildcard input."""

    name: str
    target: Any = None
    args: dict[str, Any] = field(default_factory=dict)  # schema argument name -> PNode | Wildcard | literal
    wildcard: Wildcard | None = None

    def describe(self) -> str:
        return _op_label(self.target) if self.target is not None else f"input {self.name}"


@dataclass
class PatternGraph:
    outputs: list[PNode]
    inputs: list[PNode]
    nodes: list[PNode]  # topological order

    @property
    def anchor(self) -> PNode:
        return self.outputs[0]

    def signature(self) -> str:
        """A canonical text for deduplicating spellings that trace to the same graph."""
        index = {id(n): i for i, n in enumerate(self.nodes)}

        def show(v: Any) -> str:
            if isinstance(v, PNode):
                return f"%{index[id(v)]}"
            if isinstance(v, (list, tuple)):
                return "[" + ",".join(show(x) for x in v) + "]"
            return repr(v)

        lines = [f"{index[id(n)]}={n.target}({','.join(f'{k}={show(v)}' for k, v in n.args.items())})"
                 for n in self.nodes]
        return ";".join(lines) + "|out=" + ",".join(show(o) for o in self.outputs)


def _op_label(target: Any) -> str:
    if target is None:
        return "input"
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, compat.OpOverload):
        return str(target)  # e.g. aten.add.Tensor: overloads matter (add.Tensor is not add.Scalar)
    return getattr(target, "__name__", str(target))


# ---- arguments by schema name --------------------------------------------------------------------------------
def args_by_name(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments as schema name -> value, with defaults filled in."""
    if not isinstance(target, compat.OpOverload):
        return {str(i): a for i, a in enumerate(args)}
    out: dict[str, Any] = {}
    for i, arg in enumerate(target._schema.arguments):
        if i < len(args):
            out[arg.name] = args[i]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


# ---- tracing -------------------------------------------------------------------------------------------------
def trace_pattern(fn: Callable[..., Any], example_args: Sequence[Any], input_names: Sequence[str],
                  decompositions: dict | None = None) -> PatternGraph:
    """Trace ``fn`` with fake tensors and turn it into a PatternGraph with wildcards.

    ``decompositions``: the table the graphs to match were traced with (Inductor's, on the Inductor path)."""
    tensor_positions = [i for i, a in enumerate(example_args) if isinstance(a, torch.Tensor)]
    tensor_names = [input_names[i] for i in tensor_positions]
    constants = {i: a for i, a in enumerate(example_args) if not isinstance(a, torch.Tensor)}

    def tensors_only(*tensors: torch.Tensor) -> Any:
        full = list(constants.get(i) for i in range(len(example_args)))
        for pos, t in zip(tensor_positions, tensors):
            full[pos] = t
        return fn(*full)

    return _to_pattern(_functional_graph(tensors_only, [example_args[i] for i in tensor_positions], decompositions),
                       tensor_names)


def _functional_graph(fn: Callable[..., Any], tensors: Sequence[torch.Tensor], decompositions: dict | None = None) -> torch.fx.Graph:
    """The functional ATen graph AOT autograd makes of ``fn``, made the way AOT makes it but without AOT's wrapper:
    ``make_fx`` under AOT's Python functionalization (``compat.functionalization``), ``decompositions`` applied
    inside it, dead code dropped. Plain ``make_fx`` keeps in-place ops that decompositions emit (F.rms_norm's
    ``add_``); ``aot_function`` gives the same graphs (checked for every registered pattern, with and without
    Inductor's table) at twice the cost, most of it metadata collection and RNG-state set-up a pattern never
    needs. An op registered as effectful gets AOT's effect token, which a pattern cannot match: refused."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def functional(*args: torch.Tensor) -> Any:
        with compat.below_functionalization():
            result = fn(*[compat.to_functional(a) for a in args])
            return torch.fx.node.map_aggregate(result, compat.from_functional)

    with torch.no_grad(), compat.functionalization():
        gm = make_fx(functional, decomposition_table=decompositions or {}, tracing_mode="fake",
                     _allow_non_fake_inputs=True)(*tensors)
    if any(n.op == "call_function" and n.target is torch.ops.higher_order.with_effects for n in gm.graph.nodes):
        raise PatternTraceError("the traced spelling threads an effect token (an op in it is registered as "
                                "effectful), so it cannot be matched")
    gm.graph.eliminate_dead_code()
    return gm.graph


class PatternTraceError(ValueError):
    """A spelling traced to a graph the matcher cannot use."""


def _to_pattern(graph: torch.fx.Graph, tensor_names: Sequence[str]) -> PatternGraph:
    mapping: dict[torch.fx.Node, PNode] = {}
    nodes: list[PNode] = []
    inputs: list[PNode] = []
    placeholders = iter(tensor_names)
    outputs: list[PNode] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            name = next(placeholders, None)
            if name is None:  # AOT threads an effect token through ops registered as effectful
                raise PatternTraceError("the traced spelling has more inputs than its tensors (an effect token: an op "
                                        "in it is registered as effectful), so it cannot be matched")
            p = PNode(name, wildcard=Wildcard(name, "tensor"))
            inputs.append(p)
        elif node.op == "call_function":
            named = args_by_name(node.target, node.args, node.kwargs)
            p = PNode(node.name, node.target, {k: _wildcards(node.target, k, v, mapping) for k, v in named.items()})
        elif node.op == "output":
            result = node.args[0]
            outputs = [mapping[r] for r in (result if isinstance(result, (list, tuple)) else [result])]
            continue
        else:
            raise ValueError(f"pattern tracing produced an unexpected {node.op} node")
        mapping[node] = p
        nodes.append(p)
    return PatternGraph(outputs, inputs, nodes)


def _wildcards(target: Any, name: str, value: Any, mapping: dict[torch.fx.Node, PNode]) -> Any:
    if isinstance(value, torch.fx.Node):
        return mapping[value]
    if isinstance(value, (list, tuple)):
        if target in _REDUCE_DIM_OPS and name == "dim":
            return Wildcard("dims", "dims")
        return type(value)(_wildcards(target, name, v, mapping) for v in value)
    if name in ("device", "layout", "memory_format", "pin_memory"):
        return Wildcard("_" + name, "any")
    if isinstance(value, float) and math.isclose(value, EPS_SENTINEL, rel_tol=1e-6):
        return Wildcard("eps", "scalar")
    if isinstance(value, torch.dtype) and value == TRACE_LOW_DTYPE:
        return Wildcard("dtype", "dtype")
    if isinstance(value, str) and value == GROUP_SENTINEL:
        return Wildcard("group", "str")
    if target in _SHAPE_DIM_OPS and name == "dim" and isinstance(value, int):
        return Wildcard("dim", "dim")
    if isinstance(value, int) and not isinstance(value, bool) and value == SIZE_SENTINEL:
        return Wildcard("size", "int")
    return value


# ---- matching ------------------------------------------------------------------------------------------------
class MatchFailure(Exception):
    """Why a match failed, how far it got, and which graph nodes it had bound (for near-miss reports).

    Most attempts fail at their first node and nobody reads why, so the reason is a callable, formatted on demand.
    """

    def __init__(self, reason: "str | Callable[[], str]", reached: int, bound: Sequence[torch.fx.Node] = ()) -> None:
        super().__init__()
        self._reason, self.reached, self._bound = reason, reached, bound

    @property
    def reason(self) -> str:
        if callable(self._reason):
            self._reason = self._reason()
        return self._reason

    @property
    def nodes(self) -> frozenset:
        return frozenset(g.name for g in self._bound)

    def __str__(self) -> str:
        return self.reason


@dataclass
class Match:
    pattern: PatternGraph
    anchor: torch.fx.Node
    bindings: dict[str, Any]  # wildcard name -> graph node or value
    nodes: dict[int, torch.fx.Node]  # id(PNode) -> graph node

    def node(self, p: PNode) -> torch.fx.Node:
        return self.nodes[id(p)]

    @property
    def graph_nodes(self) -> list[torch.fx.Node]:
        return list(self.nodes.values())


@dataclass
class _State:
    bindings: dict[str, Any]
    nodes: dict[int, torch.fx.Node]
    owners: dict[torch.fx.Node, int]
    # (pattern node id, graph node) pairs an earlier attempt showed cannot work (the graph node has a user outside
    # the pattern); shared by every copy of one attempt
    forbidden: dict = field(default_factory=dict)  # (id(PNode), graph node) -> the outside user's name

    def copy(self) -> "_State":
        return _State(dict(self.bindings), dict(self.nodes), dict(self.owners), self.forbidden)

    def bound_val(self, p: "PNode") -> Any:
        """The fake value of the graph node bound to ``p`` (the first one, for ops returning several)."""
        g = self.nodes.get(id(p))
        val = g.meta.get("val") if g is not None else None
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        return val if isinstance(val, torch.Tensor) else None


LIFTED_EPS = ("epsilon was lifted to a graph input (set torch._dynamo.config.specialize_float=True, "
              "or compile without dynamic=True)")


def match(pattern: PatternGraph, anchor: torch.fx.Node, max_retries: int = 8) -> Match:
    """Match ``pattern`` with its first output at ``anchor``; raise MatchFailure saying why not.

    When a structural match binds an internal pattern node to a graph node with a user outside the match, the
    match is retried with that binding ruled out, so commutative operands get their other order (in
    ``allreduce(a) + allreduce(b)``, the all_reduce whose result has no other reader is the one the pattern takes).
    """
    forbidden: dict[tuple[int, torch.fx.Node], str] = {}
    failure: MatchFailure | None = None
    for _ in range(max_retries + 1):
        try:
            state = _match_node(pattern.anchor, anchor, _State({}, {}, {}, forbidden))
        except MatchFailure as retry:
            if failure is None:
                raise
            # the retries found nothing better: the reason is the outside user that stopped the first match
            failure.reached = max(failure.reached, retry.reached)
            raise failure from None
        for out in pattern.outputs[1:]:  # further outputs must have been reached from the anchor
            if id(out) not in state.nodes:
                raise _fail(lambda: f"output {out.describe()} is not part of the computation", state)
        blocked = _outside_user(pattern, state)
        if blocked is None:
            return Match(pattern, anchor, state.bindings, state.nodes)
        p, g, user = blocked
        if (id(p), g) in forbidden:
            break
        failure = failure or _fail(lambda: f"the output of {p.describe()} ({g.name}) has another user ({user.name}) outside "
                        "the pattern", state)
        forbidden = {**forbidden, (id(p), g): user.name}
    assert failure is not None
    raise failure


def _outside_user(pattern: PatternGraph, state: _State) -> tuple[PNode, torch.fx.Node, torch.fx.Node] | None:
    outputs = {id(o) for o in pattern.outputs}
    matched = set(state.owners)
    for p in pattern.nodes:
        if p.target is None or id(p) in outputs or id(p) not in state.nodes:
            continue
        g = state.nodes[id(p)]
        for user in g.users:
            if user not in matched:
                return p, g, user
    return None


def _fail(reason: "str | Callable[[], str]", state: _State) -> MatchFailure:
    return MatchFailure(reason, len(state.nodes), tuple(state.owners))


def _match_node(p: PNode, g: Any, state: _State) -> _State:
    if p.wildcard is not None:
        if not isinstance(g, torch.fx.Node):
            raise _fail(lambda: f"expected a tensor for {p.name}, found the constant {g!r}", state)
        bound = state.bindings.get(p.name)
        if bound is not None and bound is not g:
            raise _fail(lambda: f"{p.name} must be the same tensor in both places ({bound.name} vs {g.name})", state)
        state.bindings[p.name] = g
        return state
    if not isinstance(g, torch.fx.Node) or g.op != "call_function":
        found = g.name if isinstance(g, torch.fx.Node) else repr(g)
        raise _fail(lambda: f"expected {p.describe()} where the graph has {found}", state)
    if g.target != p.target:
        raise _fail(lambda: f"expected {p.describe()} where the graph has {_op_label(g.target)} ({g.name})", state)
    if id(p) in state.nodes:
        if state.nodes[id(p)] is not g:
            raise _fail(lambda: f"{p.describe()} would have to be two different nodes", state)
        return state
    if g in state.owners:
        raise _fail(lambda: f"{g.name} would have to play two parts in the pattern", state)
    if (id(p), g) in state.forbidden:
        user = state.forbidden[(id(p), g)]
        raise _fail(lambda: f"the output of {p.describe()} ({g.name}) has another user ({user}) outside the pattern",
                    state)
    state.nodes[id(p)] = g
    state.owners[g] = id(p)
    gargs = args_by_name(g.target, g.args, g.kwargs)
    orders = [list(p.args)]
    pair = COMMUTATIVE.get(p.target)
    if pair is not None:
        names = list(p.args)
        swapped = list(names)
        i, j = pair
        swapped[i], swapped[j] = names[j], names[i]
        orders.append(swapped)
    last: MatchFailure | None = None
    for order in orders:
        trial = state.copy() if len(orders) > 1 else state
        try:
            for pname, gname in zip(p.args, order):
                trial = _match_value(p.args[pname], gargs.get(gname), trial, p, pname)
            return trial
        except MatchFailure as err:
            if last is None or err.reached > last.reached:
                last = err
    assert last is not None
    raise last


def _match_value(pv: Any, gv: Any, state: _State, owner: PNode, arg: str) -> _State:
    if isinstance(pv, PNode):
        return _match_node(pv, gv, state)
    if isinstance(pv, Wildcard):
        return _match_wildcard(pv, gv, state, owner)
    if isinstance(pv, (list, tuple)):
        if not isinstance(gv, (list, tuple)) or len(gv) != len(pv):
            raise _fail(lambda: f"{owner.describe()} argument {arg}: expected {pv!r}, found {gv!r}", state)
        for a, b in zip(pv, gv):
            state = _match_value(a, b, state, owner, arg)
        return state
    if isinstance(gv, torch.fx.Node):
        raise _fail(lambda: f"{owner.describe()} argument {arg}: expected the constant {pv!r}, found {gv.name}", state)
    if pv != gv or (isinstance(pv, bool) != isinstance(gv, bool)):
        raise _fail(lambda: f"{owner.describe()} argument {arg}: expected {pv!r}, found {gv!r}", state)
    return state


def _match_wildcard(w: Wildcard, gv: Any, state: _State, owner: PNode) -> _State:
    if w.kind == "any":
        return state
    if w.kind == "scalar":
        if isinstance(gv, torch.fx.Node):
            raise _fail(LIFTED_EPS if w.name == "eps" else f"{w.name} is a graph value, not a constant", state)
        if not isinstance(gv, (int, float)) or isinstance(gv, bool):
            raise _fail(lambda: f"{w.name} must be a number, found {gv!r}", state)
    elif w.kind == "dtype" and not isinstance(gv, torch.dtype):
        raise _fail(lambda: f"{owner.describe()}: expected a dtype, found {gv!r}", state)
    elif w.kind == "dim":  # one dimension, bound non-negative: -1 and 3 are the same dim of a 4-d tensor
        if not isinstance(gv, int) or isinstance(gv, bool):
            raise _fail(lambda: f"{owner.describe()}: {w.name} must be a constant int, found {gv!r}", state)
        if gv < 0:
            val = state.bound_val(owner)
            if val is None:
                raise _fail(lambda: f"{owner.describe()}: dim {gv} cannot be normalized without shape metadata", state)
            gv += val.dim()
    elif w.kind == "int" and (not isinstance(gv, int) or isinstance(gv, bool)):
        raise _fail(lambda: f"{owner.describe()}: {w.name} must be a constant int, found {gv!r}", state)
    elif w.kind == "str" and not isinstance(gv, str):
        raise _fail(lambda: f"{owner.describe()}: {w.name} must be a constant string, found {gv!r}", state)
    elif w.kind == "dims" and not (isinstance(gv, (list, tuple)) and all(isinstance(d, int) for d in gv)):
        raise _fail(lambda: f"{owner.describe()}: reduction dims must be constant, found {gv!r}", state)
    if w.name in state.bindings and state.bindings[w.name] != gv:
        raise _fail(lambda: f"{w.name} differs between its uses ({state.bindings[w.name]!r} vs {gv!r})", state)
    state.bindings[w.name] = gv
    return state
