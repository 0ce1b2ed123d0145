"""GPU: add_rms_norm and add_rms_norm_quant_fp8 (bf16) — ours (Triton) vs eager torch vs Inductor's kernel, in GB/s
against the copy bandwidth measured in the same run.

    python benchmarks/kernels.py [--out DIR] [--sweep]

Prints a markdown table and saves kernels.png (when matplotlib is there). Bytes counted: read x, residual and the
weight, write out and residual_out (out is 1 byte per element for fp8).

Kernel time is measured inside a CUDA graph (``triton.testing.do_bench_cudagraph``), as the kernels run in a
captured model: it excludes the Python and launcher overhead of each call, which differs between our op call and
Inductor's generated wrapper and dominates at a few tokens. That overhead is reported separately (µs per eager
call). ``--sweep`` instead prints our kernel's bandwidth for each ``num_warps``, the measurement behind
``ops.triton_kernels.default_warps``.
"""
from __future__ import annotations

import argparse
import os

import torch
import triton.testing

from fxpasses import ops  # noqa: F401
from fxpasses.ops.norms import rms_norm_reference
from fxpasses.ops.quant import quant_fp8_reference

TOKENS = [1, 16, 128, 1024, 8192]
HIDDEN = [4096, 8192]


def eager_add_norm(x, r, w, eps):
    s = x + r
    return rms_norm_reference(s, w, eps), s


def eager_add_norm_fp8(x, r, w, eps, scale):
    s = x + r
    return quant_fp8_reference(rms_norm_reference(s, w, eps), scale), s


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() / ms / 1e6  # GB/s, read + write


def kernel_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50)


def shapes():
    """(fp8, hidden, tokens, x, residual, weight, bytes moved) for every measured shape, bf16."""
    for fp8 in (False, True):
        for h in HIDDEN:
            for t in TOKENS:
                x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
                r, w = torch.randn_like(x), torch.randn(h, device="cuda", dtype=torch.bfloat16)
                yield fp8, h, t, x, r, w, 2 * (3 * t * h + h) + (1 if fp8 else 2) * t * h


def sweep() -> None:
    from fxpasses.ops.triton_kernels import _launch, default_warps

    scale = torch.tensor([0.05], device="cuda")
    warps = [1, 2, 4, 8, 16]
    print("| op | tokens | hidden | " + " | ".join(f"{w} warps GB/s" for w in warps) + " | best | default |")
    print("|---|---|---|" + "---|" * len(warps) + "---|---|")
    for fp8, h, t, x, r, w, nbytes in shapes():
        gbs = [nbytes / kernel_ms(lambda: _launch(x, r, w, 1e-6, scale if fp8 else None, num_warps=n)) / 1e6
               for n in warps]
        best = warps[max(range(len(warps)), key=gbs.__getitem__)]
        print(f"| {'add_rms_norm_quant_fp8' if fp8 else 'add_rms_norm'} | {t} | {h} | "
              + " | ".join(f"{g:.0f}" for g in gbs) + f" | {best} | {default_warps(h, t)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    copy = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {copy:.0f} GB/s\n")
    if args.sweep:
        return sweep()
    print("| op | tokens | hidden | ours GB/s | eager GB/s | inductor GB/s | ours / copy | ours / inductor "
          "| ours call µs | inductor call µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    fused = torch.compile(eager_add_norm)
    fused_fp8 = torch.compile(eager_add_norm_fp8)
    scale = torch.tensor([0.05], device="cuda")
    for fp8, h, t, x, r, w, nbytes in shapes():
        if fp8:
            cases = [lambda: torch.ops.fxp.add_rms_norm_quant_fp8(x, r, w, 1e-6, scale),
                     lambda: eager_add_norm_fp8(x, r, w, 1e-6, scale),
                     lambda: fused_fp8(x, r, w, 1e-6, scale)]
        else:
            cases = [lambda: torch.ops.fxp.add_rms_norm(x, r, w, 1e-6),
                     lambda: eager_add_norm(x, r, w, 1e-6),
                     lambda: fused(x, r, w, 1e-6)]
        gbs = [nbytes / kernel_ms(c) / 1e6 for c in cases]
        call_us = [1e3 * triton.testing.do_bench(c, warmup=25, rep=100) for c in (cases[0], cases[2])]
        name = "add_rms_norm_quant_fp8" if fp8 else "add_rms_norm"
        rows.append((name, t, h, *gbs))
        print(f"| {name} | {t} | {h} | {gbs[0]:.0f} | {gbs[1]:.0f} | {gbs[2]:.0f} | {gbs[0] / copy:.0%} | "
              f"{gbs[0] / gbs[2]:.2f}x | {call_us[0]:.1f} | {call_us[1]:.1f} |", flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, name in zip(axes, ("add_rms_norm", "add_rms_norm_quant_fp8")):
            for h, style in zip(HIDDEN, ("-", "--")):
                sel = [r for r in rows if r[0] == name and r[2] == h]
                for i, label in enumerate(("ours", "eager", "inductor")):
                    ax.plot([r[1] for r in sel], [r[3 + i] for r in sel], style, marker="o", label=f"{label} h={h}")
            ax.axhline(copy, color="gray", lw=0.8, label="copy bandwidth")
            ax.set_xscale("log")
            ax.set_title(f"{name} (bf16)")
            ax.set_xlabel("tokens")
        axes[0].set_ylabel("GB/s")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "kernels.png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
