"""The one pipeline, as named stages, and the helper that runs it on a graph.

    cleanup (in-place collectives made functional) → patterns → user passes → weights (non-Inductor: which
      projections' weights no node writes, fxpasses.stable_weights) → finalize (stable topological sort, side-effect-safe DCE)
      → Inductor (the graph stays functional: Inductor re-inplaces HOPs itself)
      → or defunctionalize (+ DCE) → run the FX graph

Graphs captured outside AOT (make_fx, export, hand-built) are first re-traced by ``fxpasses.canonical`` (what
``rewrite`` does), so every stage sees the same functional form; ``canonicalize=True`` adds the lighter
``functionalize`` stage for graphs whose only writes are mutating custom ops.
"""
from __future__ import annotations

from typing import Sequence

from fxpasses.cleanup import eliminate_common_subexpressions, remove_noop_ops, strip_asserts
from fxpasses.collectives import canonicalize_collectives
from fxpasses.dependency import eliminate_dead_code, stable_topological_sort
from fxpasses.functionalization import defunctionalize, functionalize
from fxpasses.pass_manager import PassManager, Stage
from fxpasses.passes import Pass
from fxpasses.stable_weights import mark_stable_weights


def build_pipeline(
    patterns: Sequence[Pass] = (),
    extra_passes: Sequence[Pass] = (),
    *,
    canonicalize: bool = False,
    defunctionalize_after: bool = True,
) -> PassManager:
    stages = []
    if canonicalize:
        stages.append(Stage("canonicalize", [functionalize]))
    stages += [
        Stage("cleanup", [strip_asserts, remove_noop_ops, canonicalize_collectives, eliminate_common_subexpressions]),
        Stage("patterns", list(patterns), records_matches=True),
        Stage("user", list(extra_passes)),
        # PDL weight prefetch: which projections' weights no node writes (after every pass that could add a write)
        *([Stage("weights", [mark_stable_weights])] if defunctionalize_after else []),
        Stage("finalize", [stable_topological_sort, eliminate_dead_code]),
    ]
    if defunctionalize_after:
        stages.append(Stage("defunctionalize", [defunctionalize, eliminate_dead_code]))
    return PassManager(stages)
