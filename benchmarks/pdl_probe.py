"""GPU probe: does programmatic dependent launch (PDL) shorten a chain of decode GEMVs inside one CUDA graph?

    python benchmarks/pdl_probe.py [--layers 16] [--hidden 2048] [--inter 8192]

A 1-token decode step is ~100-180 small kernels back to back, each paying ~2 µs of launch and tail on top of its
bytes (docs/performance.md). With PDL a kernel may be launched while the previous one is still running; it calls
``gdc_wait`` before it reads anything the previous kernel wrote, so the launch (and, with ``prefetch``, the first
block of its weight, which no kernel in the step writes) overlaps the previous kernel's tail.

The chain is a Llama layer's four projections (qkv, o, gate_up, down at the given sizes) per layer, each reading
the previous one's output, all captured in one CUDA graph. Variants: cuBLAS (``F.linear``); our GEMV without PDL;
with PDL (wait first); with PDL and the first weight block loaded before the wait. Every variant's output is
checked against the plain GEMV's (the same arithmetic, so it must be bit-equal).

The ``fxp.linear`` rows run the same chain through the op's own launcher (``ops/triton_linear.launch`` with the
tile ``choose`` picks, or the default GEMV tile for a shape the table does not name): without PDL (what
``FXPASSES_PDL=0`` runs), with PDL waiting first, and with PDL and ``weight_stable`` (the first weight block read
before the wait, what a graph gets where ``fxpasses.stable_weights`` marked the projection). Each is checked
bit-equal to the op's launch without PDL. The ``fxp.linear/probe-tile`` rows run the op's kernel with the probe
GEMV's tile (4 columns x 1024 of K, 4 warps, on every shape), to tell the tile's part from the kernel's.
"""
from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _gemv(X, W, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn.to(tl.int64)[:, None] * K + rk[None, :]
    if PREFETCH:
        w = tl.load(w_ptrs)  # weights are never written inside the step: safe to read before the wait
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    if not PREFETCH:
        w = tl.load(w_ptrs)
    acc = w.to(tl.float32) * tl.load(X + rk).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc += tl.load(w_ptrs + k0).to(tl.float32) * tl.load(X + k0 + rk).to(tl.float32)[None, :]
    tl.store(Y + rn, tl.sum(acc, axis=1).to(Y.dtype.element_ty))


def gemv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, pdl: bool, prefetch: bool) -> None:
    n, k = w.shape
    block_n, block_k = 4, min(1024, k)
    _gemv[(n // block_n,)](x, w, y, n, k, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, PREFETCH=prefetch,
                           num_warps=4, launch_pdl=pdl)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=8192)
    args = parser.parse_args()
    h, i = args.hidden, args.inter
    shapes = [(h + h // 2, h), (h, h), (2 * i, h), (h, i)]  # qkv, o, gate_up, down (n, k)
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k ** 0.5
               for _ in range(args.layers) for n, k in shapes]
    outs = [torch.empty(w.shape[0], device="cuda", dtype=torch.bfloat16) for w in weights]
    x0 = torch.randn(h, device="cuda", dtype=torch.bfloat16, generator=g)

    from fxpasses.ops import triton_linear as tl_lin

    os.environ["FXPASSES_PDL"] = "1"  # the rows say whether to use PDL and the prefetch; the setting must allow both

    configs = [tl_lin.choose(1, n, k) or tl_lin.default_config(1, n, k) for w in weights for n, k in [w.shape]]
    probe_tile = tl_lin.Config(1, 4, 1024, 4, 1)

    def step(variant: str) -> None:
        x = x0
        for w, y, c in zip(weights, outs, configs):
            xin = x[: w.shape[1]]
            c = probe_tile if "probe-tile" in variant else c
            if variant == "cublas":
                torch.matmul(w, xin, out=y)
            elif variant.startswith("fxp.linear"):
                tl_lin.launch(xin.view(1, -1), w, None, c, out=y.view(1, -1), pdl="pdl" in variant,
                              weight_stable="prefetch" in variant)
            else:
                gemv(xin, w, y, pdl=variant != "gemv", prefetch=variant == "gemv+pdl+prefetch")
            x = y

    bytes_read = sum(w.numel() * 2 for w in weights)
    copy_src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy = 2 * copy_src.numel() / triton.testing.do_bench(lambda: copy_dst.copy_(copy_src)) / 1e6
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{len(weights)} GEMVs, {bytes_read / 1e9:.2f} GB of weights, floor {bytes_read / copy / 1e3:.1f} µs at "
          f"{copy:.0f} GB/s\n")
    print("| variant | step (µs) | per GEMV (µs) | vs floor | equal to gemv |")
    print("|---|---|---|---|---|")
    reference = op_reference = None
    for variant in ("cublas", "gemv", "gemv+pdl", "gemv+pdl+prefetch", "fxp.linear", "fxp.linear+pdl",
                    "fxp.linear+pdl+prefetch", "fxp.linear/probe-tile", "fxp.linear/probe-tile+pdl",
                    "fxp.linear/probe-tile+pdl+prefetch"):
        try:
            step(variant)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                step(variant)
            graph.replay()
            torch.cuda.synchronize()
            result = outs[-1].clone()
            if variant == "gemv":
                reference = result
            if variant in ("fxp.linear", "fxp.linear/probe-tile"):
                op_reference = result
            ref = op_reference if variant.startswith("fxp.linear") else reference
            same = "-" if ref is None or variant == "cublas" else str(torch.equal(result, ref))
            us = triton.testing.do_bench(graph.replay, warmup=20, rep=200) * 1e3
            print(f"| {variant} | {us:.1f} | {us / len(weights):.2f} | {us / (bytes_read / copy / 1e3):.2f}x | {same} |",
                  flush=True)
        except Exception as e:  # a probe: report and go on
            print(f"| {variant} | failed: {type(e).__name__}: {str(e)[:200]} | | | |", flush=True)


if __name__ == "__main__":
    main()
