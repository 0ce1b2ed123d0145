"""The pipeline's pattern stage: one pass that applies a PatternSet and reports matches and near misses."""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch.fx

from fxpasses import patterns as pattern_registry
from fxpasses import compat
from fxpasses.dependency import stable_topological_sort
from fxpasses.passes import PassContext, PassResult


class PatternRewritePass:
    """Applies every pattern of a PatternSet to a fixed point; counts are pattern name -> matches."""

    name = "pattern_rewrites"

    def __init__(self, pattern_set: pattern_registry.PatternSet) -> None:
        self.pattern_set = pattern_set

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        match_ctx = pattern_registry.MatchContext(ctx.mapping, ctx.config, ctx.tp_group_name, ctx.pp_group_name)
        applied = self.pattern_set.apply(gm, match_ctx)
        result = PassResult(counts=dict(applied.counts), modified=bool(applied.counts))
        if applied.counts:
            # a multi-output replacement can land before a user of one of its outputs; fix only that
            stable_topological_sort(gm)
        result.notes = [f"near miss: {m}" for m in applied.near_misses]
        if ctx.report is not None:
            ctx.report.near_misses.extend(applied.near_misses)
        return result

    def uuid(self) -> str:
        return hashlib.sha256("\n".join(self.pattern_set.identity()).encode()).hexdigest()[:16]


def split_patterns(items: Iterable[Any] | None, mapping: Any, config: Any, inductor: bool = False) -> list[Any]:
    """Backend(patterns=...) accepts registered Pattern objects or their names (applied together by one pass,
    largest benefit first) and plain pass callables (run after). None means every registered pattern.
    ``inductor``: the graphs come decomposed with Inductor's table, so the patterns are traced with it too."""
    items = pattern_registry.all() if items is None else list(items)
    registered, passes = [], []
    for item in items:
        if isinstance(item, str):
            registered.append(pattern_registry.get(item))
        elif isinstance(item, pattern_registry.Pattern):
            registered.append(item)
        elif callable(item):
            passes.append(item)
        else:
            raise TypeError(f"patterns: {item!r} is neither a Pattern, a pattern name nor a pass callable.")
    out: list[Any] = []
    if registered:
        decompositions = (pattern_registry.Decompositions("inductor", compat.inductor_decompositions())
                          if inductor else None)
        with compat.outside_tracing():
            pattern_set = pattern_registry.PatternSet(registered, mapping, config, decompositions)
        out.append(PatternRewritePass(pattern_set))
    return out + passes
