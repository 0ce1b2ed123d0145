"""The pattern registry and every pattern fxpasses ships.

``patterns.all()`` lists the registered patterns (largest benefit first). A Backend builds its own
``PatternSet`` from them for its Mapping. Depends on ``ops`` only.
"""
from patterns import elementwise, norms, quant  # noqa: F401  (registration happens on import)
from patterns.matcher import Match, MatchFailure, PatternGraph
from patterns.norms import rms_norm_spelling, rms_norm_spellings
from patterns.registry import (
    ApplyResult,
    Builder,
    Decompositions,
    MatchContext,
    NearMiss,
    Pattern,
    PatternSet,
    all_patterns,
    get,
    pattern,
    register,
    traced_variants,
)

all = all_patterns  # noqa: A001  (patterns.all(), as users call it)

__all__ = [
    "ApplyResult", "Builder", "Decompositions", "Match", "MatchContext", "MatchFailure", "NearMiss", "Pattern", "PatternGraph",
    "PatternSet", "all", "all_patterns", "get", "pattern", "register", "rms_norm_spelling", "rms_norm_spellings", "traced_variants",
]
