"""CPU: what the fxpasses pipeline costs inside a whole torch.compile, for the tiny Llama at 2-64 layers.

    python benchmarks/compile_time.py [--layers 2 8 32 64]

"whole compile" is the first compiled call minus a warm call (Dynamo, AOT autograd, our pipeline). Targets
(issue 6): the pipeline under 5% of the whole at 32 layers; its time per layer flat (within 1.5x) from 8 to 64.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import fxpasses
from fxpasses.models import LlamaConfig, build_model, make_steps


def measure(layers: int) -> tuple[float, float, dict[str, float]]:
    config = dataclasses.replace(LlamaConfig(), num_layers=layers)
    model = build_model("llama", config)
    batch = make_steps(config.vocab_size, decode_steps=0)[0]
    backend = fxpasses.Backend()
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    args = (batch.input_ids, batch.position_ids, batch.slot_ids)
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn(*args)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn(*args)
        warm = time.perf_counter() - t0
    return first - warm, backend.report.pipeline_seconds, backend.report.pass_seconds()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32, 64])
    args = parser.parse_args()
    measure(2)  # warm-up: imports, pattern tracing
    rows = [(n, *measure(n)) for n in args.layers]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| layers | whole compile (s) | pipeline (ms) | pipeline share | pipeline per layer (ms) | slowest passes (ms) |")
    print("|---|---|---|---|---|---|")
    for n, whole, pipe, passes in rows:
        top = sorted(passes.items(), key=lambda kv: -kv[1])[:3]
        print(f"| {n} | {whole:.2f} | {pipe * 1e3:.1f} | {pipe / whole:.1%} | {pipe * 1e3 / n:.2f} | "
              + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in top) + " |")
    per_layer = {n: pipe / n for n, _, pipe, _ in rows}
    if 8 in per_layer and 64 in per_layer:
        print(f"\nper-layer pipeline time, 64 vs 8 layers: {per_layer[64] / per_layer[8]:.2f}x (target: within 1.5x)")


if __name__ == "__main__":
    main()
