"""How much the verifier adds to the pipeline: pipeline time with verify on and off, by graph size.

    python benchmarks/verifier_cost.py

Prints a markdown table. The model is a decoder-shaped stack (RMSNorm, projections, SiLU gate, residual adds)
with a pipeline receive at the start and a send at the end, so the effect checks have work to do.
"""
from __future__ import annotations

import time

import torch

import fxpasses
from fxpasses.testing import fake_process_group


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


def pipeline_seconds(layers: int, verify: bool) -> tuple[float, float]:
    """(pipeline seconds, whole torch.compile seconds: Dynamo, AOT and the pipeline)."""
    model = Stack(layers).eval()
    backend = fxpasses.Backend(verify=verify)
    torch._dynamo.reset()
    with torch.no_grad():
        t0 = time.perf_counter()
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(8, 64))
        total = time.perf_counter() - t0
    return backend.report.pipeline_seconds, total


def main() -> None:
    print("| layers | whole compile (s) | pipeline, verify off (ms) | pipeline, verify on (ms) | verifier share of compile |")
    print("|---|---|---|---|---|")
    with fake_process_group(2, 0):
        for layers in (8, 32, 64):
            off = min((pipeline_seconds(layers, False) for _ in range(2)), key=lambda r: r[1])
            on = min((pipeline_seconds(layers, True) for _ in range(2)), key=lambda r: r[1])
            share = (on[0] - off[0]) / on[1]
            print(f"| {layers} | {on[1]:.2f} | {off[0] * 1e3:.1f} | {on[0] * 1e3:.1f} | {share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
