"""Cleanup on the functional graph: remove what blocks pattern matches without changing any value.

- ``strip_asserts``: ``aten._assert_tensor_metadata`` that export adds (each is a user that blocks a match).
- ``remove_noop_ops``: views/reshapes/expands to the same shape, full slices, conversions to the same dtype, and
  the copy an in-place ``dist.all_reduce`` leaves: the functional ``aten.copy(dst, src)`` in AOT graphs, or
  ``aten.copy_(dst, src)`` into an intermediate in export graphs. A node is only replaced by its input when
  neither takes part in an in-place mutation, so removing a copy can never make two buffers alias.
  Buffers are identified by ``storage_root``: through views *and* through the result of an in-place op
  (``y.add_(1)`` returns ``y`` itself), so ``y.add_(1); y.copy_(x)`` on a non-canonical graph is a write to ``y``.
- ``eliminate_common_subexpressions``: one node for each repeated pure computation (``x.float()`` written twice is
  one cast), so a pattern spelled with one cast matches code that wrote two. Only side-effect-free,
  non-random ops are merged, and never a tensor that is written in place or handed to a mutating op (two
  ``empty`` receive buffers are two buffers), nor one that reads such a tensor.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpasses.effects import is_hop, is_impure, is_view, node_args_by_name, written_buffers, written_tensors
from fxpasses.passes import PassContext, PassResult

aten = torch.ops.aten

_ASSERTS = {getattr(aten, "_assert_tensor_metadata", None)}
_ASSERTS = {getattr(op, "default", None) for op in _ASSERTS if op is not None}


def strip_asserts(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    result = PassResult()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
            result.count("asserts_removed")
    return result


strip_asserts.name = "strip_asserts"  # type: ignore[attr-defined]


def aliased_argument(node: torch.fx.Node) -> torch.fx.Node | None:
    """The argument a node's single tensor result aliases (a view's base, an in-place op's ``self``), or None."""
    if node.op != "call_function" or is_hop(node):
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is None or len(schema.returns) != 1 or schema.returns[0].alias_info is None:
        return None
    if not isinstance(schema.returns[0].type, torch.TensorType):
        return None
    alias_set = schema.returns[0].alias_info.before_set
    values = node_args_by_name(node)
    for arg in schema.arguments:
        if arg.alias_info is not None and arg.alias_info.before_set == alias_set:
            value = values.get(arg.name)
            return value if isinstance(value, torch.fx.Node) else None
    return None


def storage_root(node: object) -> object:
    """The node that owns a value's storage: follows views and in-place results back to it."""
    while isinstance(node, torch.fx.Node):
        source = aliased_argument(node)
        if source is None:
            return node
        node = source
    return node


def _val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (_same_shape(a, b) and a.dtype == b.dtype and a.device == b.device
            and all(statically_known_true(x == y) for x, y in zip(a.stride(), b.stride())))


def _fold_intermediate_copy(graph: torch.fx.Graph, node: torch.fx.Node, writes: Counter, position: dict) -> bool:
    """``copy_(dst, src)`` into a fresh intermediate (export's form of an in-place all_reduce): read src instead.

    Safe when dst is a plain intermediate written only here, src is never written, both have the same layout,
    and no view of dst made before the copy is read after it.
    """
    dst, src = node.args[0], node.args[1]
    if not (isinstance(dst, torch.fx.Node) and isinstance(src, torch.fx.Node)) or node.kwargs:
        return False
    if (dst.op in ("placeholder", "get_attr") or storage_root(dst) is not dst or writes[dst] != 1
            or writes[storage_root(src)]):
        return False
    a, b = _val(dst), _val(src)
    if a is None or b is None or not _same_layout(a, b):
        return False
    if any(is_view(u) and any(position[w] > position[node] for w in u.users) for u in dst.users):
        return False
    if _would_alias_an_output(dst, src, next(n for n in reversed(graph.nodes) if n.op == "output")):
        return False
    for user in list(dst.users):
        if user is not node and position[user] > position[node]:
            user.replace_input_with(dst, src)
    node.replace_all_uses_with(src)
    graph.erase_node(node)
    return True


def _returned(node: torch.fx.Node, output: torch.fx.Node) -> bool:
    """Is ``node``, or a view of it (transitively), a graph output?"""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user is output:
                return True
            if is_view(user):
                stack.append(user)
    return False


def _would_alias_an_output(node: torch.fx.Node, src: torch.fx.Node, output: torch.fx.Node) -> bool:
    """Replacing ``node`` (a tensor of its own) by ``src`` makes whatever of ``node`` is returned share ``src``'s
    storage: a caller who writes that output would write a graph input, or another output, which eager never did."""
    if not _returned(node, output):
        return False
    root = storage_root(src)
    return not isinstance(root, torch.fx.Node) or root.op in ("placeholder", "get_attr") or _returned(root, output)


# Ops whose result, when it has the input's shape, dtype, device and strides, holds exactly the input's values.
_SAME_LAYOUT_NOOPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default, aten.alias.default,
    aten.slice.Tensor, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
}


def _noop_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input this node is a no-op of, or None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    out, src = _val(node), node.args[0]
    inp = _val(src)
    if out is None or inp is None:
        return None
    t = node.target
    if t in _SAME_LAYOUT_NOOPS:
        return src if _same_layout(out, inp) else None
    if t is aten.copy.default and isinstance(node.args[1], torch.fx.Node):
        src2 = _val(node.args[1])
        return node.args[1] if src2 is not None and _same_layout(out, src2) else None
    return None


def remove_noop_ops(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    result = PassResult()
    graph = gm.graph
    writes = written_buffers(graph, root=storage_root)
    position = {n: i for i, n in enumerate(graph.nodes)}
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.copy_.default:
            if _fold_intermediate_copy(graph, node, writes, position):
                result.count("removed_copy_")
            continue
        src = _noop_input(node)
        if src is None or writes[storage_root(node)] or writes[storage_root(src)]:
            continue
        if not is_view(node) and _would_alias_an_output(node, src, output):
            continue
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        result.count(f"removed_{node.target._opname if hasattr(node.target, '_opname') else node.target}")
    return result


remove_noop_ops.name = "remove_noop_ops"  # type: ignore[attr-defined]


def _cse_key(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_cse_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _cse_key(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", repr(value))  # 0.0 and -0.0 are different constants
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value.node.expr))
    return value


def merge_duplicates(graph: torch.fx.Graph, eligible: Callable[[torch.fx.Node], bool]) -> int:
    """Replace each eligible call that repeats an earlier one (same op, same arguments) by the earlier one."""
    seen: dict[object, torch.fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not eligible(node):
            continue
        try:
            key = (node.target, _cse_key(node.args), _cse_key(node.kwargs))
            hash(key)
        except TypeError:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    return merged


def eliminate_common_subexpressions(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    graph = gm.graph
    written = {storage_root(w) for n in graph.nodes for w in written_tensors(n)}
    for n in graph.nodes:  # functional HOP wrappers name what the wrapped op writes: their inputs stay unmerged
        if is_hop(n):
            written.update(storage_root(a) for a in n.all_input_nodes)

    def pure(node: torch.fx.Node) -> bool:
        if is_hop(node) or is_impure(node) or storage_root(node) in written:
            return False
        if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
            return False
        return not any(storage_root(a) in written for a in node.all_input_nodes)

    result = PassResult()
    result.count("merged", merge_duplicates(graph, pure))
    return result


eliminate_common_subexpressions.name = "eliminate_common_subexpressions"  # type: ignore[attr-defined]
