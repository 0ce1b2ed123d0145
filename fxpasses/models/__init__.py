"""Reference models for tensor- and pipeline-parallel torch.compile: Llama and DeepSeekV3-style decoders.

``build_model(name, config, mapping)`` builds this rank's pipeline stage with its tensor-parallel shards; the
process groups must exist (``fxpasses.init_process_groups``) when tp or pp is above 1. ``make_steps`` gives a
prefill and decode steps of token-flattened input; ``run_steps`` runs them (optionally compiled).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxpasses.mapping import Mapping, cached_process_groups
from fxpasses.models.common import Batch, Parallel, PipelineStage, make_steps
from fxpasses.models.deepseek import DeepSeekConfig, build_deepseek
from fxpasses.models.llama import LlamaConfig, build_llama

MODELS: dict[str, tuple[type, Callable[..., PipelineStage]]] = {
    "llama": (LlamaConfig, build_llama),
    "deepseek": (DeepSeekConfig, build_deepseek),
}


def build_model(name: str, config: Any = None, mapping: Mapping | None = None) -> PipelineStage:
    """This rank's stage of model ``name`` ("llama" or "deepseek")."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    config_cls, build = MODELS[name]
    config = config if config is not None else config_cls()
    mapping = mapping or Mapping()
    config.validate(mapping)
    groups = cached_process_groups(mapping)
    if (mapping.has_tp or mapping.has_pp) and groups is None:
        raise RuntimeError("build_model: call fxpasses.init_process_groups(mapping) first (tp or pp is above 1).")
    parallel = Parallel(mapping, groups.tp.group_name if groups else None, groups.pp.group_name if groups else None)
    return build(config, parallel)


def run_steps(model: torch.nn.Module, steps: list[Batch], fn: Callable[..., Any] | None = None) -> list[Any]:
    """Run every step (marking the token dimension dynamic, so one compile serves prefill and decode)."""
    fn = model if fn is None else fn
    outputs = []
    with torch.inference_mode():
        for batch in steps:
            for t in (batch.input_ids, batch.position_ids, batch.slot_ids):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            outputs.append(fn(batch.input_ids, batch.position_ids, batch.slot_ids))
    return outputs


__all__ = ["Batch", "DeepSeekConfig", "LlamaConfig", "MODELS", "PipelineStage", "build_model", "make_steps", "run_steps"]
