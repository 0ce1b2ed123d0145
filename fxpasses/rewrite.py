"""``fxpasses.rewrite``: the pipeline on a graph you captured yourself, without torch.compile.

What each capture path gives, and what rewrite does with it:
- ``torch.export.export(...)`` → an ``ExportedProgram``; ``.module()`` gives a GraphModule with parameters as
  attributes, the user's calling convention (pytree in and out), ``_assert_tensor_metadata`` nodes, and
  mutating custom ops as direct calls. rewrite works on ``.module()`` (an ExportedProgram is unlifted first).
- ``make_fx(f, tracing_mode="fake" | "symbolic")`` → flat inputs, aten ops, mutating ops as direct calls
  (non-functional); ``make_fx(f)`` with real tensors also works when ``example_inputs`` are given.
- ``aot_export_module`` / an AOT forward graph → functional, mutating ops as ``auto_functionalized(_v2)``.

Every path is first functionalized (direct calls of mutating custom ops → ``auto_functionalized_v2``) so patterns
see one form, then runs the same pipeline as the Backend and is defunctionalized, so the result runs as is.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

from fxpasses.mapping import Mapping, cached_process_groups
from fxpasses.passes import PassContext, PipelineConfig
from fxpasses.pattern_pass import split_patterns
from fxpasses.passes import Pass
from fxpasses.pipeline import build_pipeline
from fxpasses.report import Report


def rewrite(
    graph: Any,
    mapping: Mapping | None = None,
    *,
    patterns: Sequence[Any] | None = None,
    extra_passes: Sequence[Pass] = (),
    example_inputs: Sequence[Any] | None = None,
    strict: bool = False,
    verify: bool | None = None,
) -> tuple[torch.fx.GraphModule, Report]:
    """Rewrite an ExportedProgram, its ``.module()``, a make_fx graph or an AOT graph; return (module, report).

    The returned module has the same calling convention as the input. It is rewritten in place when the input
    is a GraphModule. ``example_inputs`` fill in shape metadata (``meta['val']``) where the capture left none.
    """
    if isinstance(graph, torch.export.ExportedProgram):
        gm = graph.module()
    elif isinstance(graph, torch.fx.GraphModule):
        gm = graph
    else:
        raise TypeError(
            f"rewrite: expected a torch.export.ExportedProgram or a torch.fx.GraphModule, got {type(graph).__name__}."
        )
    if example_inputs is not None and _missing_vals(gm):
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        FakeTensorProp(gm).propagate(*example_inputs)
    mapping = mapping or Mapping()
    groups = cached_process_groups(mapping)
    report = Report(graphs=1)
    config = PipelineConfig(strict=strict) if verify is None else PipelineConfig(verify=verify, strict=strict)
    ctx = PassContext(
        mapping=mapping,
        config=config,
        report=report,
        tp_group_name=groups.tp.group_name if groups else None,
        pp_group_name=groups.pp.group_name if groups else None,
    )
    build_pipeline(split_patterns(patterns, mapping, config), extra_passes, canonicalize=True).run(gm, ctx)
    gm.recompile()
    return gm, report


def _missing_vals(gm: torch.fx.GraphModule) -> bool:
    return any("val" not in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_function"))
