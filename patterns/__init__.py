"""The pattern registry and every pattern fxpasses ships.

``patterns.all()`` lists the registered patterns (largest benefit first). A Backend builds its own
``PatternSet`` from them for its Mapping. Depends on ``ops`` only.
"""
from fxpasses.patterns import elementwise, linear, norms, quant  # noqa: F401  (registration happens on import)
from fxpasses.patterns import attention  # noqa: F401  (rope_attention; registration happens on import)
from fxpasses.patterns.matcher import Match, MatchFailure, PatternGraph
from fxpasses.patterns.norms import rms_norm_spelling, rms_norm_spellings
from fxpasses.patterns.registry import (
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
