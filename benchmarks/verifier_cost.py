"""What the pipeline's checks cost: the always-on invariants and the full verifier, side by side, as a share of a
whole torch.compile.

    python benchmarks/verifier_cost.py [--layers 8 32 64] [--repeat 2]

Prints a markdown table. Two models:
- ``llama``: the reference tiny Llama of ``fxpasses.models`` (hidden 64), single rank, as ``compile_time.py``;
- ``pp-stack``: a decoder-shaped stack (RMSNorm, projections, SiLU gate, residual adds) with a pipeline receive at
  the start and a send at the end, on a fake 2-rank process group, so the effect checks have work to do.

Each configuration is compiled with ``verify`` off and on. The pipeline itself times its checks and reports them
as the ``checks/invariants`` and ``checks/verifier`` rows of ``Backend.report`` (the pass rows exclude them), so
both costs come from the compile that paid them. "Whole compile" is the first compiled call minus a warm call
(Dynamo, AOT autograd, the pipeline). The row kept of ``--repeat`` runs is the one with the fastest whole compile.
fxpasses' on-disk compile cache is turned off (``FXPASSES_CACHE=0``): a hit would skip the pipeline being measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import time
from typing import Any, Callable

import torch

import fxpasses
from fxpasses.models import LlamaConfig, build_model, make_steps
from fxpasses.testing import fake_process_group

os.environ["FXPASSES_CACHE"] = "0"  # every compile must run the pipeline it measures


class Layer(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w_norm = torch.nn.Parameter(torch.ones(d))
        self.up = torch.nn.Linear(d, 2 * d, bias=False)
        self.down = torch.nn.Linear(d, d, bias=False)

    def forward(self, h, residual):
        residual = h + residual
        x = residual.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = self.w_norm * x.to(h.dtype)
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up), residual


class Stack(torch.nn.Module):
    def __init__(self, layers: int, d: int = 64) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer(d) for _ in range(layers))

    def forward(self, h):
        residual = torch.zeros_like(h)
        torch.ops.fxp.pp_recv_tensors([h, residual], 1, "0")
        for layer in self.layers:
            h, residual = layer(h, residual)
        torch.ops.fxp.pp_send_tensors([h, residual], 1, "0")
        return h


def llama(layers: int) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    config = dataclasses.replace(LlamaConfig(), num_layers=layers)
    batch = make_steps(config.vocab_size, decode_steps=0)[0]
    return build_model("llama", config), (batch.input_ids, batch.position_ids, batch.slot_ids)


def pp_stack(layers: int) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    return Stack(layers).eval(), (torch.randn(8, 64),)


MODELS: dict[str, Callable[[int], tuple[torch.nn.Module, tuple[Any, ...]]]] = {"llama": llama, "pp-stack": pp_stack}


@dataclasses.dataclass
class Run:
    whole: float  # seconds: first call minus a warm call
    pipeline: float  # seconds in the pipeline, checks included
    invariants: float  # seconds in the always-on checks
    verifier: float  # seconds in the full verifier (0 with verify off)


def compile_once(model_name: str, layers: int, verify: bool) -> Run:
    model, args = MODELS[model_name](layers)
    backend = fxpasses.Backend(verify=verify)
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn(*args)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn(*args)
        warm = time.perf_counter() - t0
    if backend.report.pipeline_seconds == 0.0:
        raise RuntimeError("the pipeline did not run (served from a cache?): nothing to measure")
    seconds = backend.report.pass_seconds()
    return Run(first - warm, backend.report.pipeline_seconds, seconds.get("checks/invariants", 0.0),
               seconds.get("checks/verifier", 0.0))


def best(model_name: str, layers: int, verify: bool, repeat: int) -> Run:
    return min((compile_once(model_name, layers, verify) for _ in range(repeat)), key=lambda r: r.whole)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, "
          f"{datetime.date.today().isoformat()}; compiles run on the CPU\n")
    print("| model | layers | whole compile (s) | pipeline (ms) | invariants, always on (ms) | invariants share "
          "| verifier, verify=True (ms) | verifier share |")
    print("|---|---|---|---|---|---|---|---|")
    with fake_process_group(2, 0):
        compile_once("llama", 2, False)  # warm-up: imports, pattern tracing
        for model_name in args.models:
            for layers in args.layers:
                off = best(model_name, layers, False, args.repeat)
                on = best(model_name, layers, True, args.repeat)
                print(f"| {model_name} | {layers} | {off.whole:.2f} | {off.pipeline * 1e3:.1f} | "
                      f"{off.invariants * 1e3:.2f} | {off.invariants / off.whole:.2%} | "
                      f"{on.verifier * 1e3:.1f} | {on.verifier / on.whole:.1%} |", flush=True)


if __name__ == "__main__":
    main()
