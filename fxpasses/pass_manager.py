"""Runs passes in order, times them, verifies after each, and rolls back a pass that fails.

A failing pass (or one the verifier rejects) is recorded in the report with its traceback; in non-strict mode
the graph is restored to what it was before that pass and the pipeline continues, so compilation succeeds with
correct results. In strict mode the error is raised, chained to the original.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Sequence

import torch.fx

from fxpasses.passes import PassContext, PassResult, pass_name
from fxpasses.report import PassRecord, Report
from fxpasses.verifier import snapshot, verify

log = logging.getLogger("fxpasses")

Pass = Callable[[torch.fx.GraphModule, PassContext], PassResult]


class PassError(RuntimeError):
    """A pass raised or produced a graph the verifier rejected (strict mode)."""


@dataclass
class Stage:
    """A named group of passes. In a ``records_matches`` stage, a pass's counts are pattern-name → matches."""

    name: str
    passes: Sequence[Pass]
    records_matches: bool = False


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = new.graph_copy(graph, value_map)
    new.output(out, type_expr=getattr(next(iter(reversed(graph.nodes))), "type", None))
    new._codegen = graph._codegen
    return new


class PassManager:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext, graph_index: int = 0) -> Report:
        report = ctx.report if ctx.report is not None else Report()
        ctx.report = report
        verify_on = ctx.config.verify
        snap = snapshot(gm.graph) if verify_on else None
        t_start = time.perf_counter()
        for stage in self.stages:
            for p in stage.passes:
                name = pass_name(p)
                backup = _copy_graph(gm.graph)
                t0 = time.perf_counter()
                try:
                    result = p(gm, ctx)
                    if not isinstance(result, PassResult):
                        raise TypeError(f"pass {name!r} returned {type(result).__name__}, not a PassResult")
                    if verify_on:
                        snap = verify(gm.graph, snap, name)
                    gm.recompile()
                except Exception as err:
                    seconds = time.perf_counter() - t0
                    gm.graph = backup
                    gm.recompile()
                    report.passes.append(PassRecord(f"{stage.name}/{name}", seconds, False,
                                                    error=traceback.format_exc(), graph=graph_index))
                    if ctx.config.strict:
                        raise PassError(f"fxpasses: pass {name!r} (stage {stage.name!r}) failed: {err}") from err
                    log.warning("fxpasses: pass %r failed and was rolled back: %s", name, err)
                    if verify_on:
                        snap = snapshot(gm.graph)
                    continue
                seconds = time.perf_counter() - t0
                report.passes.append(PassRecord(f"{stage.name}/{name}", seconds, result.modified,
                                                dict(result.counts), list(result.notes), graph=graph_index))
                if stage.records_matches:
                    report.add_matches(result.counts)
                for note in result.notes:
                    log.info("fxpasses: %s: %s", name, note)
        report.pipeline_seconds += time.perf_counter() - t_start
        return report
