"""Run a reference model compiled with fxpasses on real ranks and compare with a single-process eager model.

``run_rank`` is what each rank does (picklable, for ``RankPool.run``): build its stage, compile it with a Backend for
its Mapping, run a prefill and decode steps, and return its logits (last stage) and what the pipeline did.
``compare`` checks the last stage's logits against the eager reference.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from fxpasses.backend import Backend
from fxpasses.mapping import Mapping, init_process_groups
from fxpasses.models import MODELS, build_model, make_steps, run_steps
from fxpasses.testing import progress


# The demo's prompts (one sequence per cache slot): a prefill of these lengths, then one token per sequence a step.
PROMPT_LENS = (5, 3)


def max_decode_steps(config: Any) -> int:
    """The most decode steps whose positions still fit the model's KV cache (``config.max_len`` per slot)."""
    return config.max_len - max(PROMPT_LENS)


@dataclass
class RankResult:
    rank: int
    mapping: Mapping
    matches: dict[str, int]
    predicted: dict[str, int]
    pass_ms: dict[str, float]
    compile_s: float
    graphs: int
    errors: list[str]
    near_misses: list[str]
    logits: list[torch.Tensor] | None = None  # on the last stage
    report: str = ""


def make_config(model: str, layers: int, dtype: torch.dtype, **overrides: Any) -> Any:
    config_cls = MODELS[model][0]
    return dataclasses.replace(config_cls(), num_layers=layers, dtype=dtype, **overrides)


def run_rank(rank: int, world_size: int, model: str, tp: int, pp: int, config: Any, decode_steps: int = 4,
             dump_dir: str | None = None) -> RankResult:
    mapping = Mapping(world_size=world_size, rank=rank, tp_size=tp, pp_size=pp)
    # A reused rank process may have compiled another model: PipelineStage.forward is the same code object, and a
    # recompile would make changed constants dynamic (an epsilon lifted to a graph input matches no pattern).
    torch._dynamo.reset()
    init_process_groups(mapping)
    stage = build_model(model, config, mapping)
    backend = Backend(mapping, dump_dir=f"{dump_dir}/rank{rank}" if dump_dir else None)
    progress(f"compiling stage {mapping.pp_rank} (layers {list(mapping.pp_layers(config.num_layers))})")
    compiled = torch.compile(stage, backend=backend)
    steps = make_steps(config.vocab_size, PROMPT_LENS, decode_steps=decode_steps)
    t0 = time.perf_counter()
    outputs = run_steps(stage, steps, compiled)
    progress(f"ran prefill + {decode_steps} decode steps in {time.perf_counter() - t0:.1f} s")
    r = backend.report
    return RankResult(
        rank=rank, mapping=mapping, matches=dict(r.matches), predicted=config.predicted_matches(mapping),
        pass_ms={k: v * 1e3 for k, v in r.pass_seconds().items()}, compile_s=r.compile_seconds, graphs=r.graphs,
        errors=[e.error for e in r.errors], near_misses=[str(m) for m in r.near_misses],
        logits=[o.clone() for o in outputs] if mapping.is_last_pp_rank else None, report=str(r),
    )


def reference_logits(model: str, config: Any, decode_steps: int = 4) -> list[torch.Tensor]:
    """The single-process eager model with the same weights, on the same steps."""
    stage = build_model(model, config, Mapping())
    return run_steps(stage, make_steps(config.vocab_size, PROMPT_LENS, decode_steps=decode_steps))


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """TP sums partial products in another order than one process does; bf16 also rounds per stage."""
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)


def compare(results: list[RankResult], reference: list[torch.Tensor], dtype: torch.dtype) -> list[str]:
    """Problems found, empty when every last-stage rank's logits match the reference at every step."""
    problems = []
    for res in results:
        if res.logits is None:
            continue
        for step, (got, want) in enumerate(zip(res.logits, reference)):
            try:
                torch.testing.assert_close(got.float(), want.float(), **tolerance(dtype))
            except AssertionError as err:
                problems.append(f"rank {res.rank} step {step}: {str(err).splitlines()[0]}")
    return problems
