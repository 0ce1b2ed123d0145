"""Checks that a pass kept the graph valid, its outputs and its effects intact.

Two levels, because the pipeline must always catch a broken graph but cannot afford the full dependency analysis
on every compile (measured costs: ``benchmarks/verifier_cost.py``, ``docs/pipeline.md``):

**Invariants, always on** (:func:`baseline` once before the pipeline, :func:`check_invariants` after each pass;
linear in the graph, a small fraction of one percent of a compile):
- the graph is well-formed (what ``graph.lint()`` checks, with a short message): every node belongs to it, names are
  unique, every argument is defined before its use, targets exist. A node defined after its use is either a
  misplaced node or a cycle; the message says which (a cycle would crash the rollback of the *next* pass);
- the outputs: as many as before the pipeline, each with the same shape, dtype, stride and device in
  ``meta['val']`` (symbolic sizes compared as sympy expressions, without guarding). An output a pass created
  without ``meta['val']`` gets it by running its new nodes on fake tensors, so a pass cannot hide a change by
  leaving the metadata out;
- the graph inputs written (a ``copy_`` into a placeholder, a mutating op on it or on a view of it): exactly the
  ones written before the pipeline, so no input mutation is lost or invented.

**Full verifier, behind ``verify``** (:func:`snapshot` before a pass, :func:`verify` after): before a pass,
:func:`snapshot` records the effect sequence (communication and registered side effects, in order), the set of
graph inputs written, and every ordering constraint of the graph (see ``dependency``). After the pass,
:func:`verify` checks:
- the graph lints (every use after its definition, well-formed targets);
- every effect is still there, exactly once, in the same order; the same inputs are written;
- the data edges of the new graph plus the old ordering constraints (between nodes that still exist) form a DAG
  that the new order respects: a cycle means the pass moved a read past a write or an effect past another.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable

import networkx as nx
import sympy
import torch
import torch.fx

from fxpasses import compat
from fxpasses.dependency import ordering_edges
from fxpasses.effects import effect_signature, is_hop, is_view, mutable_args

log = logging.getLogger("fxpasses")

_LEGAL_OPS = frozenset({"placeholder", "call_method", "call_module", "call_function", "get_attr", "output", "root"})


class VerificationError(RuntimeError):
    """A pass produced an invalid graph or changed its outputs or effects."""

    def __init__(self, pass_name: str, problem: str, nodes: list[str] | None = None) -> None:
        self.pass_name, self.problem, self.nodes = pass_name, problem, nodes or []
        where = f" (nodes: {', '.join(self.nodes)})" if self.nodes else ""
        super().__init__(f"after pass {pass_name!r}: {problem}{where}")


# ---- invariants (always on) -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueSpec:
    """What the caller sees of one output: for a tensor its shape, stride (ints or sympy), dtype and device; for a
    SymInt/SymFloat its expression; otherwise the Python type. ``None`` where the graph had no ``meta['val']``."""

    kind: str  # "tensor", "sym", "other"
    shape: tuple[Any, ...] = ()
    stride: tuple[Any, ...] = ()
    dtype: Any = None
    device: Any = None
    expr: Any = None
    type_name: str = ""

    def describe(self) -> str:
        if self.kind == "tensor":
            return f"{self.dtype} {list(self.shape)} stride {list(self.stride)} on {self.device}"
        if self.kind == "sym":
            return f"symbolic {self.expr}"
        return self.type_name


@dataclass
class Baseline:
    """The always-on invariants' view of the graph before the pipeline: its outputs and the inputs it writes."""

    outputs: list[ValueSpec | None]
    input_writes: frozenset[str]


def _expr(x: Any) -> Any:
    """An int, or the sympy expression of a SymInt/SymFloat (read without adding a guard)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.expr
    return x


def value_spec(val: Any) -> ValueSpec | None:
    if val is None:
        return None
    if isinstance(val, torch.Tensor):
        return ValueSpec("tensor", tuple(_expr(s) for s in val.shape), tuple(_expr(s) for s in val.stride()),
                         val.dtype, val.device)
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ValueSpec("sym", expr=_expr(val))
    return ValueSpec("other", type_name=type(val).__name__)


def _same(a: Any, b: Any) -> bool:
    if a == b:  # ints, dtypes, devices, structurally equal sympy expressions
        return True
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        try:
            return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0
        except (TypeError, sympy.SympifyError):
            return False
    return False


def _spec_difference(before: ValueSpec, after: ValueSpec) -> str | None:
    """What changed between two specs, or None."""
    if before.kind != after.kind:
        return f"was {before.describe()}, now {after.describe()}"
    if before.kind == "tensor":
        if before.dtype != after.dtype:
            return f"dtype changed from {before.dtype} to {after.dtype}"
        if len(before.shape) != len(after.shape) or not all(map(_same, before.shape, after.shape)):
            return f"shape changed from {list(before.shape)} to {list(after.shape)}"
        if len(before.stride) != len(after.stride) or not all(map(_same, before.stride, after.stride)):
            return f"stride changed from {list(before.stride)} to {list(after.stride)}"
        if before.device != after.device:
            return f"device changed from {before.device} to {after.device}"
        return None
    if before.kind == "sym":
        return None if _same(before.expr, after.expr) else f"changed from {before.expr} to {after.expr}"
    return None if before.type_name == after.type_name else f"was {before.type_name}, now {after.type_name}"


def _output_values(graph: torch.fx.Graph) -> list[Any]:
    """The leaves of the output node's arguments, in order (Nodes and constants)."""
    out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if out is None:
        return []
    leaves: list[Any] = []
    torch.fx.node.map_aggregate(out.args, lambda x: leaves.append(x) or x)
    return leaves


def _leaf_spec(leaf: Any) -> ValueSpec | None:
    if isinstance(leaf, torch.fx.Node):
        return value_spec(leaf.meta.get("val"))
    return value_spec(leaf) if leaf is not None else None


_VIEWS: dict[Any, bool] = {}
_WRITES: dict[Any, tuple[tuple[int, str], ...]] = {}


def _is_view(node: torch.fx.Node) -> bool:
    """``effects.is_view``, cached by target (a property of the op alone; its schema is slow to walk each time)."""
    try:
        return _VIEWS[node.target]
    except KeyError:
        _VIEWS[node.target] = result = is_view(node)
        return result
    except TypeError:  # unhashable target
        return is_view(node)


def _written_positions(node: torch.fx.Node) -> tuple[tuple[int, str], ...]:
    """(position, name) of each argument the node's op writes (``effects.mutable_args``), cached by target. The
    auto-functionalization HOPs write nothing in place (``effects.written_tensors`` agrees)."""
    try:
        return _WRITES[node.target]
    except (KeyError, TypeError):
        pass
    found: tuple[tuple[int, str], ...] = ()
    if not is_hop(node) and getattr(node.target, "_schema", None) is not None:
        index = {a.name: i for i, a in enumerate(node.target._schema.arguments)}
        found = tuple((index[m.name], m.name) for m in mutable_args(node.target))
    try:
        _WRITES[node.target] = found
    except TypeError:
        pass
    return found


def _writes(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """Whether ``user`` writes ``value`` in place (passed positionally or by name, alone or in a list)."""
    for position, name in _written_positions(user):
        arg = user.args[position] if position < len(user.args) else user.kwargs.get(name)
        if arg is value or (isinstance(arg, (list, tuple)) and any(a is value for a in arg)):
            return True
    return False


def _is_self_copy(node: torch.fx.Node) -> bool:
    return (node.target is torch.ops.aten.copy_.default and len(node.args) >= 2 and node.args[0] is node.args[1])


def _written_through(value: torch.fx.Node, depth: int = 0) -> bool:
    """Whether some user writes ``value``, or a view of it (views followed through their first argument, as
    ``effects.base_of`` follows them back)."""
    for user in value.users:
        if user.op != "call_function":
            continue
        if _is_self_copy(user):  # copy_(x, x) writes x's own values back: no write (defunctionalize drops it)
            continue
        if _writes(user, value):
            return True
        if depth < 64 and user.args and user.args[0] is value and _is_view(user) and _written_through(user, depth + 1):
            return True
    return False


def written_inputs(graph: torch.fx.Graph) -> frozenset[str]:
    """Names of the placeholders some node writes, directly or through views (what ``effects`` counts as an input
    write), found by walking only the placeholders' users and their views: cheap enough to run after every pass."""
    return frozenset(ph.name for ph in graph.find_nodes(op="placeholder") if _written_through(ph))


def check_well_formed(graph: torch.fx.Graph, pass_name: str) -> None:
    """What ``graph.lint()`` checks, in one pass, with a short message naming the nodes (lint prints the whole
    graph). A use before its definition is reported as a cycle when it is one."""
    seen: set[torch.fx.Node] = set()
    names: set[str] = set()
    outputs = 0
    owner = graph.owning_module
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if not seen.issuperset(inputs):  # seen holds only this graph's nodes: a foreign one fails here too
            arg = next(a for a in inputs if a not in seen)
            if arg.graph is not graph:
                raise VerificationError(pass_name, f"{node.name} uses {arg.name}, a node of another graph",
                                        [node.name, arg.name])
            raise _use_before_definition(graph, pass_name, node, arg)
        if node.graph is not graph:
            raise VerificationError(pass_name, "a node of another graph is in this graph's node list", [node.name])
        op = node.op
        if op == "call_function":
            if not callable(node.target):
                raise VerificationError(pass_name, f"call_function target {node.target!r} is not callable",
                                        [node.name])
        elif op == "output":
            outputs += 1
        elif op in ("get_attr", "call_module"):
            if owner is not None:
                _check_attr(owner, node, pass_name)
        elif op not in _LEGAL_OPS:
            raise VerificationError(pass_name, f"unknown opcode {op!r}", [node.name])
        if node.name in names:
            raise VerificationError(pass_name, f"two nodes are named {node.name!r}", [node.name])
        seen.add(node)
        names.add(node.name)
    if outputs != 1:
        raise VerificationError(pass_name, f"the graph has {outputs} output nodes, not 1")


def _check_attr(module: torch.nn.Module, node: torch.fx.Node, pass_name: str) -> None:
    if not isinstance(node.target, str):
        raise VerificationError(pass_name, f"{node.op} target {node.target!r} is not a string", [node.name])
    obj: Any = module
    for atom in node.target.split("."):
        if not hasattr(obj, atom):
            raise VerificationError(pass_name, f"{node.op} target {node.target!r} does not exist in the module",
                                    [node.name])
        obj = getattr(obj, atom)


def _use_before_definition(graph: torch.fx.Graph, pass_name: str, node: torch.fx.Node,
                           arg: torch.fx.Node) -> VerificationError:
    """Only on failure: find out whether the misplaced use closes a cycle (data edges only)."""
    if arg in set(graph.nodes):
        dg = nx.DiGraph((inp, n) for n in graph.nodes for inp in n.all_input_nodes)
        try:
            cycle = nx.find_cycle(dg, arg)
            return VerificationError(pass_name, "dependency cycle", [u.name for u, _ in cycle])
        except nx.NetworkXNoCycle:
            return VerificationError(pass_name, f"{node.name} uses {arg.name} before it is defined",
                                     [node.name, arg.name])
    return VerificationError(pass_name, f"{node.name} uses {arg.name}, which is no longer in the graph",
                             [node.name, arg.name])


def baseline(graph: torch.fx.Graph) -> Baseline:
    """The invariants' reference, taken before the first pass. The graph handed in must itself be well-formed."""
    check_well_formed(graph, "<input graph>")
    return Baseline([_leaf_spec(v) for v in _output_values(graph)], written_inputs(graph))


def check_invariants(graph: torch.fx.Graph, before: Baseline, pass_name: str, fake_mode: Any = None) -> None:
    """The always-on checks after a pass; raises :class:`VerificationError` naming what broke."""
    check_well_formed(graph, pass_name)
    leaves = _output_values(graph)
    if len(leaves) != len(before.outputs):
        raise VerificationError(pass_name, f"the graph returns {len(leaves)} values, not {len(before.outputs)}")
    for i, (leaf, want) in enumerate(zip(leaves, before.outputs)):
        if want is None:
            continue
        if isinstance(leaf, torch.fx.Node) and "val" not in leaf.meta:
            _infer_val(graph, leaf, fake_mode)
        got = _leaf_spec(leaf)
        if got is None:
            log.warning("fxpasses: after pass %r, output %d (%s) has no meta['val'] and none could be inferred: "
                        "its shape and dtype are not checked", pass_name, i, leaf)
            continue
        problem = _spec_difference(want, got)
        if problem:
            name = leaf.name if isinstance(leaf, torch.fx.Node) else repr(leaf)
            raise VerificationError(pass_name, f"output {i} ({name}) {problem}", [name])
    writes = written_inputs(graph)
    if writes != before.input_writes:
        lost, new = sorted(before.input_writes - writes), sorted(writes - before.input_writes)
        what = "; ".join(x for x in (f"no longer writes {lost}" if lost else "",
                                     f"now also writes {new}" if new else "") if x)
        raise VerificationError(pass_name, f"graph input mutation changed: {what}", lost + new)


def _infer_val(graph: torch.fx.Graph, node: torch.fx.Node, fake_mode: Any) -> None:
    """Fill ``meta['val']`` of a node a pass created without it (and of its inputs that lack it) by running it on
    fake tensors. Leaves the node as it was when that is not possible (unknown target, no fake mode)."""
    missing: list[torch.fx.Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if "val" in n.meta or n in missing:
            continue
        if n.op != "call_function":
            return
        missing.append(n)
        stack.extend(n.all_input_nodes)
    if fake_mode is None:
        vals = [p.meta.get("val") for p in graph.find_nodes(op="placeholder")]
        try:
            fake_mode = compat.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        except Exception:  # several fake modes (make_fx with real tensors): nothing to run on
            return
        if fake_mode is None:
            return
    position = {n: i for i, n in enumerate(graph.nodes)}
    try:
        with fake_mode:
            for n in sorted(missing, key=position.__getitem__):
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
                n.meta["val"] = n.target(*args, **kwargs)
    except Exception as err:  # the check then says it could not see this output
        log.debug("fxpasses: could not infer meta['val'] of %s: %s", node.name, err)


# ---- the full verifier (verify=True) ----------------------------------------------------------------------------
@dataclass
class Snapshot:
    effects: list[Hashable]
    input_writes: set[str]
    constraints: list[tuple[str, str, str]]


def snapshot(graph: torch.fx.Graph) -> Snapshot:
    effects, inputs = effect_signature(graph)
    return Snapshot(effects, inputs, [(a.name, b.name, k) for a, b, k in ordering_edges(graph)])


def verify(graph: torch.fx.Graph, before: Snapshot, pass_name: str) -> Snapshot:
    try:
        graph.lint()
    except Exception as err:
        raise VerificationError(pass_name, f"graph lint failed: {err}") from err
    after = snapshot(graph)
    if after.effects != before.effects:
        missing = list((Counter(before.effects) - Counter(after.effects)).elements())
        extra = list((Counter(after.effects) - Counter(before.effects)).elements())
        what = ("dropped " + repr(missing) if missing else "") + (" added " + repr(extra) if extra else "")
        raise VerificationError(pass_name, f"side effects changed: {what.strip() or 'reordered'}; "
                                           f"before {before.effects}, after {after.effects}")
    if after.input_writes != before.input_writes:
        raise VerificationError(
            pass_name, f"graph inputs written changed from {sorted(before.input_writes)} to {sorted(after.input_writes)}"
        )
    by_name = {n.name: n for n in graph.nodes}
    position = {n: i for i, n in enumerate(graph.nodes)}
    dg = nx.DiGraph()
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            dg.add_edge(inp, node)
    for a, b, kind in before.constraints:
        na, nb = by_name.get(a), by_name.get(b)
        if na is not None and nb is not None and na is not nb:
            if position[na] > position[nb]:
                raise VerificationError(pass_name, f"{kind} order broken: {a} must come before {b}", [a, b])
            dg.add_edge(na, nb)
    if not nx.is_directed_acyclic_graph(dg):
        cycle = nx.find_cycle(dg)
        raise VerificationError(pass_name, "dependency cycle", [u.name for u, _ in cycle])
    return after
