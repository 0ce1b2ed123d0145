"""The graph as a networkx DiGraph of everything that orders its nodes, and the passes built on it.

Edges are data dependencies plus *ordering* dependencies that data edges miss:
- between consecutive side-effecting nodes (sends, receives, collectives, registered effects, input writes);
- between in-place writes and the reads and writes of the same buffer (read-before-write, write-before-read,
  write-before-write), buffers being identified through view ops to their base.

Any order that respects these edges computes the same thing with the same effects in the same order, which is
what the stable topological sort picks (the one closest to the current order) and what the verifier checks.
"""
from __future__ import annotations

from typing import Iterable

import networkx as nx
import torch.fx

from fxpasses.effects import base_of, is_impure, is_view, side_effect_nodes, written_tensors
from fxpasses.passes import PassContext, PassResult


def ordering_edges(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, torch.fx.Node, str]]:
    """Ordering constraints implied by the graph's current order (not data edges)."""
    edges: list[tuple[torch.fx.Node, torch.fx.Node, str]] = []
    effects = list(side_effect_nodes(graph))
    edges += [(a, b, "effect") for a, b in zip(effects, effects[1:])]
    last_write: dict[torch.fx.Node, torch.fx.Node] = {}
    readers: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "output" or is_view(node):
            reads: Iterable[torch.fx.Node] = () if node.op != "output" else {base_of(a) for a in node.all_input_nodes}
        else:
            reads = {base_of(a) for a in node.all_input_nodes}
        writes = {base_of(t) for t in written_tensors(node)}
        for b in reads:
            w = last_write.get(b)
            if w is not None and w is not node:
                edges.append((w, node, "raw"))
            if b not in writes:
                readers.setdefault(b, []).append(node)
        for b in writes:
            edges += [(r, node, "war") for r in readers.pop(b, []) if r is not node]
            w = last_write.get(b)
            if w is not None:
                edges.append((w, node, "waw"))
            last_write[b] = node
    return edges


def dependency_graph(graph: torch.fx.Graph) -> nx.DiGraph:
    dg = nx.DiGraph()
    for node in graph.nodes:
        dg.add_node(node)
        for inp in node.all_input_nodes:
            dg.add_edge(inp, node, kind="data")
    for a, b, kind in ordering_edges(graph):
        if not dg.has_edge(a, b):
            dg.add_edge(a, b, kind=kind)
    return dg


def stable_topological_sort(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    """Reorder only where a node comes before something it depends on; keep every effect and hazard order.

    Pattern rewrites can insert a multi-output replacement before one of its inputs is defined; this fixes that
    without moving anything else (lexicographic topological sort keyed by the current position).
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    if all(index[i] < index[n] for n in nodes for i in n.all_input_nodes):
        return PassResult()
    order = list(nx.lexicographical_topological_sort(dependency_graph(graph), key=index.__getitem__))
    result = PassResult()
    cursor = None
    for node in order:
        if node.op == "placeholder":
            cursor = node
            continue
        if cursor is not None and cursor.next is not node:
            cursor.append(node)
            result.count("moved")
        cursor = node
    return result


stable_topological_sort.name = "stable_topological_sort"  # type: ignore[attr-defined]


def eliminate_dead_code(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    """Remove unused pure nodes; keep communication, registered side effects and every in-place write."""
    result = PassResult()
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not is_impure(node):
            gm.graph.erase_node(node)
            result.count("removed")
    return result


eliminate_dead_code.name = "eliminate_dead_code"  # type: ignore[attr-defined]
