"""Cleanup on the functional graph: remove what blocks pattern matches without changing any value.

- ``strip_asserts``: ``aten._assert_tensor_metadata`` that export adds (each is a user that blocks a match).
- ``remove_noop_ops``: views/reshapes/expands to the same shape, full slices, conversions to the same dtype, and
  the functional ``aten.copy(dst, src)`` that an in-place ``dist.all_reduce`` leaves (src already has dst's shape,
  dtype and device). A node is only replaced by its input when neither takes part in an in-place mutation, so
  removing a copy can never make two buffers alias.
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpasses.effects import base_of, is_hop, written_tensors
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


def _val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (_same_shape(a, b) and a.dtype == b.dtype and a.device == b.device
            and all(statically_known_true(x == y) for x, y in zip(a.stride(), b.stride())))


def _mutated_bases(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    out: set[torch.fx.Node] = set()
    for node in graph.nodes:
        out.update(base_of(t) for t in written_tensors(node))
        if is_hop(node):
            out.update(base_of(b) for b in node.kwargs.get("_all_bases", []) or [])
            out.update(base_of(a) for a in node.all_input_nodes)
    return out


def _noop_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input this node is a no-op of, or None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    out, src = _val(node), node.args[0]
    inp = _val(src)
    if out is None or inp is None:
        return None
    t = node.target
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
             aten.alias.default, aten.view.dtype if hasattr(aten.view, "dtype") else None):
        return src if _same_layout(out, inp) else None
    if t is aten.slice.Tensor:
        return src if _same_layout(out, inp) else None
    if t in (aten._to_copy.default, aten.clone.default):
        # Only a same-dtype, same-device conversion with nothing but optional layout kwargs is a no-op value.
        return src if _same_layout(out, inp) and t is aten._to_copy.default else None
    if t is aten.copy.default and isinstance(node.args[1], torch.fx.Node):
        src2 = _val(node.args[1])
        return node.args[1] if src2 is not None and _same_layout(out, src2) else None
    return None


def remove_noop_ops(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    result = PassResult()
    graph = gm.graph
    mutated = _mutated_bases(graph)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for node in list(graph.nodes):
        src = _noop_input(node)
        if src is None or node in mutated or base_of(src) in mutated:
            continue
        if node in output.all_input_nodes and src.op == "placeholder":
            continue  # returning an input itself would alias the caller's tensor
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        result.count(f"removed_{str(node.target).split('.')[-2] if '.' in str(node.target) else node.target}")
    return result


remove_noop_ops.name = "remove_noop_ops"  # type: ignore[attr-defined]
