"""``fxpasses.rewrite``: the pipeline on a graph you captured yourself, without torch.compile.

What each capture path gives, and what rewrite does with it:
- ``torch.export.export(...)`` → an ``ExportedProgram``; ``.module()`` gives a GraphModule with parameters as
  attributes, the user's calling convention (pytree in and out), ``_assert_tensor_metadata`` nodes, aten in-place
  ops and mutating custom ops as direct calls. rewrite works on ``.module()`` (an ExportedProgram is unlifted first).
- ``make_fx(f, tracing_mode="fake" | "symbolic")`` → flat inputs, aten ops, in-place ops and mutating custom ops as
  direct calls (non-functional); ``make_fx(f)`` with real tensors leaves metadata from a different fake mode on
  every node (``example_inputs`` may be given; the graph's own metadata is used otherwise).
- ``aot_export_module`` / an AOT forward graph → functional, mutating ops as ``auto_functionalized(_v2)``.

Every graph that is not already functional is first brought to one canonical form by ``fxpasses.canonical``
(re-traced through torch's functionalization: aten in-place ops functional, mutating custom ops
``auto_functionalized``, input writes as a ``copy_`` epilogue, one fake mode), so every pass after it sees values
that nothing writes. Then the same pipeline as the Backend runs and the graph is defunctionalized, so the result
runs as is. Why a canonical form and not a per-match proof: docs/standalone-rewrite.md.
"""
from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Sequence

import torch
import torch.fx

from fxpasses import compat
from fxpasses.canonical import CanonicalizationError, canonicalize, check_example_inputs
from fxpasses.mapping import Mapping, cached_process_groups
from fxpasses.pass_manager import PassError
from fxpasses.passes import Pass, PassContext, PipelineConfig
from fxpasses.pattern_pass import split_patterns
from fxpasses.pipeline import build_pipeline
from fxpasses.report import PassRecord, Report

log = logging.getLogger("fxpasses")


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

    The returned module has the same calling convention as the input (graph inputs must not alias one another,
    as under torch.compile). It is rewritten in place when the input is a GraphModule. ``example_inputs``: one
    value per graph input (placeholder), in order; their fake copies give every node its shape metadata.

    If torch's functionalization refuses the graph (an input resized or transposed in place, an op without a fake
    implementation), nothing can be shown safe: the graph is returned unchanged and the report says why
    (``strict=True`` raises ``PassError`` instead).
    """
    if isinstance(graph, torch.export.ExportedProgram):
        gm = graph.module()
    elif isinstance(graph, torch.fx.GraphModule):
        gm = graph
    else:
        raise TypeError(
            f"rewrite: expected a torch.export.ExportedProgram or a torch.fx.GraphModule, got {type(graph).__name__}."
        )
    if mapping is not None and not isinstance(mapping, Mapping):
        raise TypeError(f"rewrite: mapping must be a fxpasses.Mapping (e.g. fxpasses.Mapping(tp_size=2) or "
                        f"fxpasses.Mapping.from_env()), got {type(mapping).__name__} {mapping!r}.")
    check_example_inputs(gm, example_inputs)
    mapping = mapping or Mapping()
    report = Report(graphs=1)
    config = PipelineConfig(strict=strict) if verify is None else PipelineConfig(verify=verify, strict=strict)
    t0 = time.perf_counter()
    try:
        result = canonicalize(gm, example_inputs)
    except CanonicalizationError as err:
        report.passes.append(PassRecord("canonicalize/canonicalize", time.perf_counter() - t0, False,
                                        error=traceback.format_exc()))
        if strict:
            raise PassError(f"fxpasses.rewrite: {err}") from err
        log.warning("fxpasses.rewrite: the graph is returned unchanged: %s", err)
        report.note(f"not rewritten: {err}; without one canonical form no rewrite can be shown to keep the results")
        return gm, report
    report.passes.append(PassRecord("canonicalize/canonicalize", time.perf_counter() - t0, result.modified,
                                    dict(result.counts), list(result.notes)))
    groups = cached_process_groups(mapping)
    ctx = PassContext(
        mapping=mapping,
        config=config,
        report=report,
        fake_mode=_fake_mode(gm),
        tp_group_name=groups.tp.group_name if groups else None,
        pp_group_name=groups.pp.group_name if groups else None,
    )
    ctx.shape_env = getattr(ctx.fake_mode, "shape_env", None)
    build_pipeline(split_patterns(patterns, mapping, config), extra_passes).run(gm, ctx)
    gm.recompile()
    return gm, report


def _fake_mode(gm: torch.fx.GraphModule) -> Any:
    """The fake mode of the graph's metadata (one, after canonicalization), for passes that build new values."""
    for node in gm.graph.nodes:
        mode = compat.fake_tensor_mode_of(node.meta.get("val"))
        if mode is not None:
            return mode
    return None
