"""Checks that a pass kept the graph valid and its effects intact.

Before a pass, :func:`snapshot` records the effect sequence (communication and registered side effects, in
order), the set of graph inputs written, and every ordering constraint of the graph (see ``dependency``). After
the pass, :func:`verify` checks:
- the graph lints (every use after its definition, well-formed targets);
- every effect is still there, exactly once, in the same order; the same inputs are written;
- the data edges of the new graph plus the old ordering constraints (between nodes that still exist) form a DAG
  that the new order respects: a cycle means the pass moved a read past a write or an effect past another.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Hashable

import networkx as nx
import torch.fx

from fxpasses.dependency import ordering_edges
from fxpasses.effects import effect_signature


class VerificationError(RuntimeError):
    """A pass produced an invalid graph or changed its effects."""

    def __init__(self, pass_name: str, problem: str, nodes: list[str] | None = None) -> None:
        self.pass_name, self.problem, self.nodes = pass_name, problem, nodes or []
        where = f" (nodes: {', '.join(self.nodes)})" if self.nodes else ""
        super().__init__(f"after pass {pass_name!r}: {problem}{where}")


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
