"""What a node does besides computing its outputs, derived from op schemas (never from a hand-kept table).

- *mutations*: which arguments an op writes (``Tensor(a!)`` / ``Tensor(a!)[]`` alias annotations);
- *views*: which outputs alias an input (a return annotated ``Tensor(a)`` with the same alias set as an argument);
- *effects*: what must never be dropped, duplicated or reordered: communication (any op with a ``group_name``
  argument: torch's functional collectives, our point-to-point and fused ops), ops registered with
  ``torch.fx.node.has_side_effect``, and writes to graph inputs.

An op wrapped in ``auto_functionalized`` / ``auto_functionalized_v2`` has the effects of the op it wraps, so a send
is the same effect before and after (de)functionalization. So has an op wrapped in ``with_effects`` (the effect-token
form ``aot_export`` / ``torch.export`` give ops registered as effectful): a collective there is still a collective.

torch's compiled point-to-point ops (``dist.isend`` / ``dist.irecv`` under ``enable_p2p_compilation``, torch 2.13)
are ``_c10d_functional.isend`` / ``irecv`` plus ``wait_tensor``. Their schemas declare no write, yet ``irecv``
fills its buffer in place and the graph reads the buffer itself afterwards; the one entry of ``HIDDEN_WRITES``
says so, and the ``wait_tensor`` completing an ``irecv`` counts as writing the buffer too (the data is there only
after it), so readers stay after the wait, common-subexpression elimination never merges reads across it, and
dead-code elimination keeps a receive into a buffer nobody reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections import Counter
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.fx

from fxpasses import compat

AUTO_FUNCTIONALIZED, AUTO_FUNCTIONALIZED_V2 = compat.auto_functionalized_ops()
HOPS = (AUTO_FUNCTIONALIZED, AUTO_FUNCTIONALIZED_V2)
WITH_EFFECTS = getattr(torch.ops.higher_order, "with_effects", None)

# Ops that write an argument their schema does not annotate: op name -> the argument written.
HIDDEN_WRITES = {"_c10d_functional::irecv": "tensor"}
_WAIT = "_c10d_functional::wait_tensor"
# Arguments naming the other rank of a point-to-point op: part of its effect key.
_PEER_ARGS = ("peer", "dst", "src")

# Fused ops perform the collective they replaced; an effect key names the collective, so a fusion keeps it.
_COLLECTIVE_KIND = {"allreduce": "all_reduce"}


def is_hop(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in HOPS


def is_with_effects(node: torch.fx.Node) -> bool:
    """``with_effects(token, op, *args)``: an effectful op threaded through an effect token."""
    return WITH_EFFECTS is not None and node.op == "call_function" and node.target is WITH_EFFECTS


def underlying_op(node: torch.fx.Node) -> Any:
    """The OpOverload a node calls, looking through the auto-functionalization HOPs and ``with_effects``."""
    if node.op != "call_function":
        return None
    if is_hop(node):
        return node.args[0]
    if is_with_effects(node) and len(node.args) >= 2:
        return node.args[1]
    return node.target


@dataclass(frozen=True)
class MutableArg:
    name: str
    is_list: bool
    optional: bool


def mutable_args(op: Any) -> list[MutableArg]:
    """Arguments an op writes, in schema order, from its alias annotations."""
    schema = getattr(op, "_schema", None)
    if schema is None:
        return []
    out = []
    for arg in schema.arguments:
        if arg.alias_info is not None and arg.alias_info.is_write:
            t = arg.type
            optional = isinstance(t, torch.OptionalType)
            inner = t.getElementType() if optional else t
            out.append(MutableArg(arg.name, isinstance(inner, torch.ListType), optional))
    return out


def returns_alias(op: Any) -> bool:
    schema = getattr(op, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def can_auto_functionalize(op: Any) -> bool:
    """A custom op that mutates arguments but returns fresh tensors (what auto_functionalized supports)."""
    return (
        isinstance(op, compat.OpOverload)
        and op.namespace not in ("aten", "prim", "prims")
        and bool(mutable_args(op))
        and not returns_alias(op)
    )


def is_view(node: torch.fx.Node) -> bool:
    """An op whose (single) return aliases its first argument without writing it: view, slice, alias, ..."""
    op = underlying_op(node)
    schema = getattr(op, "_schema", None)
    if schema is None or is_hop(node) or not schema.returns or not schema.arguments:
        return False
    ret, first = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return ret is not None and not ret.is_write and first is not None and ret.before_set == first.before_set


def returns_first_argument(node: torch.fx.Node) -> bool:
    """A direct call whose single result aliases its first argument: a view, or an in-place op (``x.add_(1)``
    returns ``x``)."""
    if node.op != "call_function" or is_hop(node) or is_with_effects(node):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None or len(schema.returns) != 1 or not schema.arguments:
        return False
    ret, first = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return ret is not None and first is not None and ret.before_set == first.before_set


def base_of(node: Any) -> Any:
    """Follow views and in-place results back to the tensor that owns the storage: in ``y = x.add_(1); y.copy_(z)``
    the copy writes ``x``."""
    while isinstance(node, torch.fx.Node) and (is_view(node) or returns_first_argument(node)):
        node = node.args[0]
    return node


def written_buffers(graph: torch.fx.Graph, root: Callable[[Any], Any] = base_of) -> Counter:
    """How many nodes write each buffer (``root`` of what they write): in place, or handed to a functionalized
    mutating op (conservatively, every input of a HOP)."""
    out: Counter = Counter()
    for node in graph.nodes:
        out.update({root(t) for t in written_tensors(node)})
        if is_hop(node):
            out.update({root(a) for a in node.all_input_nodes})
    return out


def node_args_by_name(node: torch.fx.Node) -> dict[str, Any]:
    """Direct calls (and ``with_effects`` calls) as name → value, using the schema to name positional arguments."""
    wrapped = is_with_effects(node)
    op = node.args[1] if wrapped else node.target
    schema = op._schema
    values = dict(zip((a.name for a in schema.arguments), node.args[2:] if wrapped else node.args))
    values.update(node.kwargs)
    return values


def _schema_name(op: Any) -> str:
    schema = getattr(op, "_schema", None)
    return schema.name if schema is not None else ""


def written_tensors(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Graph values a direct (non-functional) call writes in place."""
    if node.op != "call_function" or is_hop(node):
        return []
    op = underlying_op(node)
    name = _schema_name(op)
    if name in HIDDEN_WRITES or name == _WAIT:
        return _hidden_writes(node, name)
    margs = mutable_args(op)
    if not margs:
        return []
    values = node_args_by_name(node)
    out = []
    for m in margs:
        v = values.get(m.name)
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(item, torch.fx.Node):
                out.append(item)
    return out


def _hidden_writes(node: torch.fx.Node, name: str) -> list[torch.fx.Node]:
    """The buffer an ``irecv`` fills, for the irecv and for the ``wait_tensor`` that completes it."""
    if name == _WAIT:
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_function":
            return []
        name = _schema_name(underlying_op(source))
        if name not in HIDDEN_WRITES:
            return []
        node = source
    buffer = node_args_by_name(node).get(HIDDEN_WRITES[name])
    return [buffer] if isinstance(buffer, torch.fx.Node) else []


def _group_name(node: torch.fx.Node) -> str | None:
    op = underlying_op(node)
    schema = getattr(op, "_schema", None)
    if schema is None:
        return None
    names = [a.name for a in schema.arguments]
    if "group_name" not in names:
        return None
    if is_hop(node):
        return str(node.kwargs.get("group_name"))
    return str(node_args_by_name(node).get("group_name"))


def _op_label(op: Any) -> str:
    name = op._schema.name.split("::")[-1] if hasattr(op, "_schema") else str(op)
    for fused, kind in _COLLECTIVE_KIND.items():
        if name.startswith(fused):
            return kind
    return name


def effect_keys(node: torch.fx.Node, placeholders: set[torch.fx.Node]) -> tuple[list[Hashable], list[str]]:
    """(ordered effects, names of graph inputs written) for one node.

    Ordered effects are communication and registered side effects; their sequence must survive every pass.
    Input writes may move (AOT puts them at the end as ``copy_``; defunctionalization moves them to the op).
    """
    if node.op != "call_function":
        return [], []
    op = underlying_op(node)
    ordered: list[Hashable] = []
    group = _group_name(node)
    if group is not None:
        label = _op_label(op)
        if label == "wait_tensor":
            return [], []
        args = node.kwargs if is_hop(node) else node_args_by_name(node)
        peer = next((args[k] for k in _PEER_ARGS if args.get(k) is not None), None)
        ordered.append(("comm", label, group) + ((("peer", peer),) if peer is not None else ()))
    elif op in compat.side_effectful_functions() and not _is_torch_internal_effect(op) and not _is_wait(op):
        ordered.append(("effect", _op_label(op)))
    written = [base_of(t) for t in written_tensors(node)]
    inputs = [t.name for t in written if t in placeholders]
    return ordered, inputs


def _is_wait(op: Any) -> bool:
    """``wait_tensor`` completes the collective it belongs to (torch 2.13 marks it side-effecting); a fusion that
    absorbs the collective absorbs its wait, so it is not an effect of its own."""
    return getattr(op, "_schema", None) is not None and op._schema.name.endswith("wait_tensor")


def _is_torch_internal_effect(op: Any) -> bool:
    # torch marks asserts and profiler/record ops as side-effecting; they carry no ordering meaning for us.
    name = getattr(op, "__name__", "") or str(op)
    return "assert" in name or "record" in name or "profiler" in name


def is_impure(node: torch.fx.Node) -> bool:
    """Nodes dead-code elimination must keep even without users."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op != "call_function":
        return node.op == "call_module"
    op = underlying_op(node)
    if op in compat.side_effectful_functions():
        return True
    if _group_name(node) is not None:  # communication: every rank must issue it, used or not
        return True
    return bool(written_tensors(node))


def side_effect_nodes(graph: torch.fx.Graph) -> Iterator[torch.fx.Node]:
    placeholders = {n for n in graph.nodes if n.op == "placeholder"}
    for n in graph.nodes:
        ordered, inputs = effect_keys(n, placeholders)
        if ordered or inputs:
            yield n


def effect_signature(graph: torch.fx.Graph) -> tuple[list[Hashable], set[str]]:
    """The ordered communication/side-effect sequence and the set of graph inputs written."""
    placeholders = {n for n in graph.nodes if n.op == "placeholder"}
    seq: list[Hashable] = []
    inputs: set[str] = set()
    for n in graph.nodes:
        ordered, written = effect_keys(n, placeholders)
        seq.extend(ordered)
        inputs.update(written)
    return seq, inputs
