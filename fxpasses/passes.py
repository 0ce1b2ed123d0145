"""What a pass is: a function of a GraphModule and a PassContext that says what it changed.

Modeled on ``torch.fx.passes.infra`` (a pass returns a result with ``modified``), extended with counts and notes
so reports can say what each pass did. Passes keep no state between graphs: everything they need is in the
context, and everything they did is in the result.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import torch.fx

from fxpasses.mapping import Mapping

if TYPE_CHECKING:
    from fxpasses.report import Report

log = logging.getLogger("fxpasses")


@dataclass
class PassResult:
    modified: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n
            self.modified = True


def verify_default() -> bool:
    """The full verifier is off unless ``FXPASSES_VERIFY=1``: it costs 3-6% of a whole compile, about as much as
    the rest of the pipeline (measured 2026-11-29, torch 2.13 CPU: benchmarks/verifier_cost.py, table in
    docs/pipeline.md). The always-on checks (graph well-formed and acyclic, outputs' shape/dtype/stride, input
    writes) run whatever this says, at 0.1-0.6% of a compile. The test suite turns the verifier on."""
    return os.environ.get("FXPASSES_VERIFY", "0") == "1"


@dataclass
class PipelineConfig:
    """Knobs of the pipeline that change what it does (and so take part in cache keys)."""

    verify: bool = field(default_factory=verify_default)
    strict: bool = False
    defunctionalize: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"verify": self.verify, "strict": self.strict, "defunctionalize": self.defunctionalize}


@dataclass
class PassContext:
    """Everything a pass may read: the parallel layout, the config, tracing state, and the report it writes."""

    mapping: Mapping = field(default_factory=Mapping)
    config: PipelineConfig = field(default_factory=PipelineConfig)
    report: "Report | None" = None
    fake_mode: Any = None
    shape_env: Any = None
    # Process-group names of this rank's TP and PP groups, when torch.distributed is initialized.
    tp_group_name: str | None = None
    pp_group_name: str | None = None


@runtime_checkable
class GraphPass(Protocol):
    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult: ...


# What a pass is, for type hints; GraphPass is the same as a runtime-checkable Protocol.
Pass = Callable[[torch.fx.GraphModule, PassContext], PassResult]


def pass_name(p: Callable[..., Any]) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__
