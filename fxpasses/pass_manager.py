"""Runs passes in order, times them, checks the graph after each, and rolls back a pass that fails.

After every pass the always-on invariants run (``verifier.check_invariants``: the graph is well-formed and acyclic,
every output keeps its shape, dtype and stride, no graph-input write is lost); with ``verify`` the full verifier
runs too. A pass that raises, returns something other than a PassResult, or fails a check is recorded in the
report with its traceback, and the graph is rebuilt from the snapshot taken before it, whatever state the pass
left it in; in non-strict mode the pipeline continues, so compilation succeeds with correct results. In strict
mode ``PassError`` is raised, chained to the original error.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch.fx

from fxpasses.passes import Pass, PassContext, PassResult, pass_name
from fxpasses.report import PassRecord, Report
from fxpasses.verifier import baseline, check_invariants, snapshot, verify

log = logging.getLogger("fxpasses")


class PassError(RuntimeError):
    """A pass raised or produced a graph a check rejected (strict mode; its ``__cause__`` says why), or the
    rollback after such a failure could not rebuild the graph (any mode)."""


@dataclass
class Stage:
    """A named group of passes. In a ``records_matches`` stage, a pass's counts are pattern-name → matches."""

    name: str
    passes: Sequence[Pass]
    records_matches: bool = False


class GraphSnapshot:
    """Each node's fields as they are now, to rebuild the graph if a pass fails.

    Taking it costs one tuple per node (a pass that edits a node replaces its args tuple, so the old one stays
    as it was); rebuilding, which only a failure needs, creates the nodes again. The rebuild reads nothing but
    these tuples, so it works whatever the failed pass left behind (cycles, erased or dangling nodes, another
    Graph object in ``gm.graph``): every node is created first and its arguments are wired second, so the order
    of the snapshot does not matter either. Attributes that get_attr/call_module nodes name are put back too if
    the pass deleted or replaced them.
    """

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.codegen = graph._codegen
        self.tracer_cls = graph._tracer_cls
        self.nodes = [(n, n.op, n.target, n.args, n.kwargs, n.name, n.type, dict(n.meta)) for n in graph.nodes]
        # The objects that get_attr and call_module nodes name, in case the pass also deleted or replaced them.
        self.attrs: list[tuple[str, object]] = []
        root = graph.owning_module
        if root is not None:
            for op in ("get_attr", "call_module"):
                for n in graph.find_nodes(op=op):
                    obj = _resolve(root, n.target)
                    if obj is not None:
                        self.attrs.append((n.target, obj))

    def restore(self, gm: torch.fx.GraphModule) -> None:
        graph = torch.fx.Graph(owning_module=gm, tracer_cls=self.tracer_cls)
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for old, op, target, _, _, name, type_, meta in self.nodes:
            new = graph.create_node(op, target, (), {}, name, type_)
            new.meta = dict(meta)
            env[old] = new

        def lookup(node: torch.fx.Node) -> torch.fx.Node:
            if node not in env:
                raise RuntimeError(f"the snapshot refers to node {node.name!r}, which it does not hold")
            return env[node]

        for old, _, _, args, kwargs, *_ in self.nodes:
            new = env[old]
            new.args = torch.fx.node.map_arg(args, lookup)
            new.kwargs = torch.fx.node.map_arg(kwargs, lookup)
        graph._codegen = self.codegen
        for target, obj in self.attrs:
            *path, leaf = target.split(".")
            parent: object = gm
            for atom in path:
                if not hasattr(parent, atom):
                    setattr(parent, atom, torch.nn.Module())
                parent = getattr(parent, atom)
            if getattr(parent, leaf, None) is not obj:
                setattr(parent, leaf, obj)
        gm.graph = graph


def _resolve(root: object, target: object) -> object:
    """The attribute a dotted ``target`` names under ``root``, or None."""
    if not isinstance(target, str):
        return None
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
        if obj is None:
            return None
    return obj


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic GC rescans the whole heap (graphs, fake tensors) ever more often as it grows, which made
    the pipeline's time per layer grow with depth; the passes create little cyclic garbage, so pause it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class PassManager:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext, graph_index: int = 0) -> Report:
        report = ctx.report if ctx.report is not None else Report()
        ctx.report = report
        with _cyclic_gc_paused():
            return self._run(gm, ctx, report, graph_index)

    def _run(self, gm: torch.fx.GraphModule, ctx: PassContext, report: Report, graph_index: int) -> Report:
        verify_on = ctx.config.verify
        t_start = time.perf_counter()
        before = baseline(gm.graph)  # raises VerificationError if the graph handed in is itself broken
        snap = snapshot(gm.graph) if verify_on else None
        check_seconds, verify_seconds = time.perf_counter() - t_start, 0.0
        checked = 0
        for stage in self.stages:
            for p in stage.passes:
                name = pass_name(p)
                backup = GraphSnapshot(gm.graph)
                t0 = time.perf_counter()
                t_pass = t_checks = None
                try:
                    result = p(gm, ctx)
                    if not isinstance(result, PassResult):
                        raise TypeError(f"pass {name!r} returned {type(result).__name__}, not a PassResult")
                    t_pass = time.perf_counter()
                    checked += 1
                    check_invariants(gm.graph, before, name, ctx.fake_mode)
                    t_checks = time.perf_counter()
                    if verify_on:
                        snap = verify(gm.graph, snap, name)
                except Exception as err:
                    now = time.perf_counter()
                    check_seconds += (t_checks or now) - t_pass if t_pass is not None else 0.0
                    verify_seconds += now - t_checks if t_checks is not None else 0.0
                    self._roll_back(backup, gm, name, stage.name, err)
                    report.passes.append(PassRecord(f"{stage.name}/{name}", (t_pass or now) - t0, False,
                                                    error=traceback.format_exc(), graph=graph_index))
                    if ctx.config.strict:
                        raise PassError(f"fxpasses: pass {name!r} (stage {stage.name!r}) failed: {err}") from err
                    log.warning("fxpasses: pass %r failed and was rolled back: %s", name, err)
                    if verify_on:
                        snap = snapshot(gm.graph)
                    continue
                now = time.perf_counter()
                check_seconds += t_checks - t_pass
                verify_seconds += now - t_checks
                report.passes.append(PassRecord(f"{stage.name}/{name}", t_pass - t0, result.modified,
                                                dict(result.counts), list(result.notes), graph=graph_index))
                if stage.records_matches:
                    report.add_matches(result.counts)
                for note in result.notes:
                    log.info("fxpasses: %s: %s", name, note)
        # What the safety net cost, as rows of the report (the pass rows above exclude it).
        report.passes.append(PassRecord("checks/invariants", check_seconds, False, {"passes": checked},
                                        graph=graph_index))
        if verify_on:
            report.passes.append(PassRecord("checks/verifier", verify_seconds, False, {"passes": checked},
                                            graph=graph_index))
        gm.recompile()
        report.pipeline_seconds += time.perf_counter() - t_start
        return report

    @staticmethod
    def _roll_back(backup: GraphSnapshot, gm: torch.fx.GraphModule, name: str, stage: str, err: Exception) -> None:
        """Rebuild the graph from before the pass. The snapshot is of a graph that passed the checks, so this does
        not fail; if it ever did, the graph is in an unknown state and compiling on would be wrong in any mode."""
        try:
            backup.restore(gm)
        except Exception as restore_err:
            raise PassError(f"fxpasses: pass {name!r} (stage {stage!r}) failed ({err}) and the graph could not be "
                            f"restored: {restore_err}") from restore_err
