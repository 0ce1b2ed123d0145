"""One form for an all_reduce however it was written: the in-place ``dist.all_reduce(x)`` as functional collectives.

``torch.distributed._functional_collectives.all_reduce(x)`` traces to ``all_reduce → wait_tensor`` and its result
is used directly. The in-place ``dist.all_reduce(x)`` (what transformers' TP plans call in inference) traces, after
AOT functionalization, to

    all_reduce(x) → wait_tensor → aten.copy(x, wait) → _unsafe_view(.., [b*s, h]) → _unsafe_view(.., [b, s, h]) → add

(the copy is the functional form of ``x.copy_(result)``; the views are the linear layer's flatten and unflatten
of the buffer it wrote). Patterns are spelled with the functional form, so this pass rewrites the in-place form
into it:

- ``aten.copy(dst, wait)`` whose result has the wait's shape, dtype, device and strides holds exactly the wait's
  values (a functional copy is a pure function of its inputs): its users read the wait instead. The destination
  itself is untouched: nodes that read ``dst`` read its value before the collective, as they did; a graph input
  written back at the end (``copy_(input, copy)``) is still written, with the same values.
- a chain of reshapes (``view``, ``_unsafe_view``, ``reshape``) from the wait back to the wait's own layout is
  the identity (each reshape reorders nothing in row-major order): the chain's end reads the wait instead.

Nothing is rewritten when a node involved is written in place or handed to a mutating op, or when the node
replaced is a graph output (the caller's view of which outputs alias would change). The pass never moves a
collective and never removes one.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpasses.effects import written_buffers
from fxpasses.passes import PassContext, PassResult

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional

# Collectives whose result has the input's shape and is computed element by element: reshapes commute with them.
ELEMENTWISE_COLLECTIVES = {_c10d.all_reduce.default}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_layout(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.dim() != b.dim() or a.dtype != b.dtype or a.device != b.device:
        return False
    return all(statically_known_true(x == y) for x, y in zip((*a.shape, *a.stride()), (*b.shape, *b.stride())))


def collective_waits(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """``wait_tensor`` nodes completing an elementwise collective (all_reduce), in graph order."""
    return [n for n in graph.nodes
            if n.op == "call_function" and n.target is _c10d.wait_tensor.default and n.args
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].target in ELEMENTWISE_COLLECTIVES]


def canonicalize_collectives(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    """Rewrite in-place all_reduces (copy back, reshape round trips) into the functional form patterns match."""
    result = PassResult()
    graph = gm.graph
    written = written_buffers(graph)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for wait in collective_waits(graph):
        if written[wait]:
            continue
        for user in list(wait.users):
            if _is_copy_back(user, wait, written, output):
                user.replace_all_uses_with(wait)
                graph.erase_node(user)
                result.count("folded_copy")
        for user in list(wait.users):
            if user.op == "call_function" and user.target in _RESHAPES:
                result.count("folded_reshape_round_trip", _fold_round_trip(graph, wait, user, written, output))
    return result


canonicalize_collectives.name = "canonicalize_collectives"  # type: ignore[attr-defined]


def _is_copy_back(node: torch.fx.Node, wait: torch.fx.Node, written: Counter, output: torch.fx.Node) -> bool:
    """``aten.copy(dst, wait)`` (functional, no broadcast, no cast, same strides), not itself written or returned."""
    return (node.op == "call_function" and node.target is aten.copy.default and len(node.args) >= 2
            and node.args[1] is wait and not node.kwargs.get("non_blocking", False)
            and not written[node] and output not in node.users and _same_layout(_val(node), _val(wait)))


def _fold_round_trip(graph: torch.fx.Graph, wait: torch.fx.Node, first: torch.fx.Node, written: Counter,
                     output: torch.fx.Node) -> int:
    """Follow single-user reshapes from ``first``; the first one back at the wait's layout reads the wait instead.
    Returns how many round trips were folded (0 or 1)."""
    chain = [first]
    node = first
    while True:
        if written[node] or (node is not first and node.args[0] is not chain[-2]):
            return 0
        if _same_layout(_val(node), _val(wait)):
            break
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _RESHAPES:
            return 0
        node = users[0]
        chain.append(node)
    if output in node.users:
        return 0
    node.replace_all_uses_with(wait)
    for n in reversed(chain):  # the chain is dead now unless an intermediate had another user (it has not)
        if not n.users:
            graph.erase_node(n)
    return 1
