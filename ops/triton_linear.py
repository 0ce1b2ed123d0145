"""Triton kernels for ``fxp.linear`` at small token counts (M <= 32), bf16/fp16, weight ``[N, K]`` row-major.

At these sizes a projection reads its whole weight to do 2*M FLOPs per element: bandwidth is everything. Two
kernels, neither splits K (so there is no second reduction launch and no workspace):

- ``_gemv_kernel`` (M = 1): each program owns ``BLOCK_N`` output columns and walks the whole K in
  ``BLOCK_K`` steps, accumulating ``w * x`` elementwise in float32 registers and summing once at the end. Small
  ``BLOCK_N`` gives enough programs to cover every SM even at N = 2048 (and K-contiguous loads of 16 bytes).
- ``_small_m_kernel`` (2 <= M <= 32): the same walk with ``tl.dot`` on an ``[BLOCK_M, BLOCK_K] x [BLOCK_K,
  BLOCK_N]`` tile (tokens padded to 16 or 32 rows, which costs no bandwidth), so the weight is still read once.

Both accumulate in float32 and round once to the output dtype (plus the bias in float32), as cuBLAS does, but in
a different order: results equal cuBLAS's within bf16 GEMM tolerance, not bit for bit.

Which kernel and tile runs is decided per call from (M, N, K) by ``choose``: a table measured on an H200
(``benchmarks/gemm.py --sweep``); shapes and token counts it does not name go to cuBLAS, as do fp32, strided
weights and M above 32. Capture-safe: no host synchronization, no allocation but the output.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fxpasses.ops.library import LIB
from fxpasses.ops.linear import _check_add_rms_norm_linear, check_linear
from fxpasses.ops.triton_rounding import round_as

MAX_M = 32
_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Config:
    """One launch configuration. ``block_m`` 1 selects the GEMV kernel, 2..8 (a power of two, at least M) the
    several-rows GEMV, 16 or 32 the tl.dot kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"


@triton.jit
def _gemv_kernel(X, W, B, OUT, N, K, sxm, swn, som, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn.to(tl.int64)[:, None] * swn + rk[None, :]
    x_ptrs = X + m * sxm + rk
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            kmask = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & kmask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=kmask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(OUT + m * som + rn, y.to(OUT.dtype.element_ty), mask=rn < N)


@triton.jit
def _gemv_rows_kernel(X, W, B, OUT, M, N, K, sxm, swn, som, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """GEMV for 2..8 rows: each weight tile is loaded once and multiplied with every row of x."""
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn.to(tl.int64)[:, None] * swn + rk[None, :]
    x_ptrs = X + rm.to(tl.int64)[:, None] * sxm + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        else:
            kmask = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & kmask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm.to(tl.int64)[:, None] * som + rn[None, :], y.to(OUT.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _small_m_kernel(X, W, B, OUT, M, N, K, sxm, swn, som, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm.to(tl.int64)[:, None] * sxm + rk[None, :]
    w_ptrs = W + rn.to(tl.int64)[None, :] * swn + rk[:, None]  # [BLOCK_K, BLOCK_N]: W transposed, K contiguous
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
            w = tl.load(w_ptrs)
        else:
            kmask = (k0 + rk) < K
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm.to(tl.int64)[:, None] * som + rn[None, :], acc.to(OUT.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: Config,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Run one kernel on ``x2 [M, K]`` (last dim contiguous) and ``weight [N, K]`` (contiguous) with ``config``.
    Public for the benchmark's sweep and the tests; ``linear_cuda`` is what the op calls."""
    m, k = x2.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    b = bias if bias is not None else out  # never read when HAS_BIAS is false
    c = config
    even = (k % c.block_k == 0) and (n % c.block_n == 0)
    if c.block_m == 1:
        _gemv_kernel[(triton.cdiv(n, c.block_n), m)](
            x2, weight, b, out, n, k, x2.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            EVEN=even, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    elif c.block_m <= 8:
        if m > c.block_m:
            raise ValueError(f"triton_linear.launch: {c} covers at most {c.block_m} rows, x has {m}.")
        _gemv_rows_kernel[(triton.cdiv(n, c.block_n),)](
            x2, weight, b, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            EVEN=even, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps,
            num_stages=c.num_stages)
    else:
        _small_m_kernel[(triton.cdiv(n, c.block_n), triton.cdiv(m, c.block_m))](
            x2, weight, b, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            EVEN=even, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps,
            num_stages=c.num_stages)
    return out


def default_config(m: int, n: int, k: int) -> Config:
    """A tile for any shape: what the sweep found good across the Llama shapes (see ``choose`` for the table)."""
    if m == 1:
        return Config(1, 4, 1024, 4, 1)
    if m <= 8:
        return Config(triton.next_power_of_2(m), 2, 512, 4, 1)
    return Config(16 if m <= 16 else 32, 32, 256, 4, 4)


# (M bucket, N, K) -> Config, measured at least 2% faster than cuBLAS on an H200, torch 2.11 / Triton 3.6,
# 2026-11-29 (benchmarks/gemm.py --sweep, two runs; per-call µs in the comments). Shapes and buckets not listed
# use cuBLAS: the Triton kernels run only where they were measured to win. The shapes are Llama-3.2-1B's and
# Llama-3-8B's projections ([N, K] = [out, in]; qkv and gate_up fused as fxpasses.models builds them).
TABLE: dict[tuple[int, int, int], Config] = {
    (1, 512, 2048): Config(1, 2, 1024, 8, 1),  # 2.60 (cuBLAS 5.75)
    (1, 1024, 4096): Config(1, 2, 1024, 8, 1),  # 4.30 (7.67)
    (1, 2048, 2048): Config(1, 1, 2048, 2, 1),  # 4.16 (6.06)
    (1, 2048, 8192): Config(1, 4, 2048, 4, 1),  # 10.30 (13.81)
    (1, 3072, 2048): Config(1, 4, 1024, 4, 1),  # 5.12 (6.15)
    (1, 4096, 4096): Config(1, 8, 1024, 4, 1),  # 10.39 (13.39)
    (1, 4096, 14336): Config(1, 8, 1024, 4, 1),  # 29.09 (31.58)
    (1, 6144, 4096): Config(1, 4, 2048, 4, 1),  # 14.48 (16.53)
    (1, 8192, 2048): Config(1, 4, 1024, 2, 1),  # 10.26 (10.91)
    (1, 14336, 4096): Config(1, 4, 2048, 4, 1),  # 29.34 (31.12)
    (1, 16384, 2048): Config(1, 4, 1024, 2, 1),  # 17.77 (18.38)
    (8, 512, 2048): Config(8, 2, 1024, 4, 1),  # 4.57 (5.75)
    (8, 4096, 4096): Config(16, 32, 256, 4, 5),  # 11.63 (13.31)
    (8, 4096, 14336): Config(16, 32, 256, 4, 5),  # 31.52 (32.33)
    (16, 4096, 4096): Config(16, 32, 256, 4, 5),  # 11.73 (13.45 at M = 8)
    (16, 4096, 14336): Config(16, 32, 256, 4, 5),  # 31.61 (33.04 at M = 8)
    (32, 4096, 4096): Config(32, 32, 512, 4, 3),  # 12.86 (14.10)
}


def _bucket(m: int) -> int:
    return 1 if m == 1 else 8 if m <= 8 else 16 if m <= 16 else 32


def choose(m: int, n: int, k: int) -> Config | None:
    """The Triton configuration for this call, or None for cuBLAS. The table is measured at M = 1, 8 and 32;
    2..8 rows use the 8-row entry (with the rows rounded up to a power of two: a bandwidth-bound kernel is no
    slower with fewer rows), 9..16 the 16-row one where there is one."""
    if m < 1 or m > MAX_M:
        return None
    c = TABLE.get((_bucket(m), n, k))
    if c is not None and 1 < m <= 8 and 1 < c.block_m <= 8:
        c = dataclasses.replace(c, block_m=triton.next_power_of_2(m))
    return c


def linear_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_linear(x, weight, bias)
    k = x.shape[-1]
    n = weight.shape[0]
    m = x.numel() // k if k else 0
    config = choose(m, n, k) if (x.dtype in _DTYPES and weight.stride(1) == 1 and weight.stride(0) == k
                                 and (bias is None or bias.stride(0) == 1)) else None
    if config is None:
        return F.linear(x, weight, bias)
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return launch(x2, weight, bias, config).view(*x.shape[:-1], n)


# ---- add + RMSNorm + GEMV (one token per program row) -----------------------------------------------------------
MAX_NORM_K = 8192  # the whole row is held in registers
# Projections [N, K] where the fused add + RMSNorm + GEMV kernel was measured faster than the two kernels it
# replaces. Empty: the kernel was written and checked under Triton's interpreter (the sum and the normalized row
# bit-identical to fxp.add_rms_norm's, the product within bf16 tolerance) after the session's GPU time ran out, so
# it is not yet used by default; tests/test_linear.py checks it on the GPU, and benchmarks/decode.py's
# ``fxpasses+full-cudagraphs-nofuse`` mode measures the difference once entries are added here.
FUSED_SHAPES: set[tuple[int, int]] = set()


@triton.jit
def _add_norm_gemv_kernel(X, R, NW, W, OUT, ROUT, N, K, sx, sr, sro, swn, som, eps, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Program (n-block, row): h = x + r (rounded as eager's add), the row's RMSNorm in float32 rounded as
    ops/triton_kernels.py rounds it, then the GEMV of that row with BLOCK_N weight rows. Program 0 writes h."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    kmask = rk < K
    dt = X.dtype.element_ty
    x = tl.load(X + m * sx + rk, mask=kmask, other=0.0)
    r = tl.load(R + m * sr + rk, mask=kmask, other=0.0)
    h = round_as(x.to(tl.float32) + r.to(tl.float32), dt)
    if pid_n == 0:
        tl.store(ROUT + m * sro + rk, h.to(ROUT.dtype.element_ty), mask=kmask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / K + eps)
    nw = tl.load(NW + rk, mask=kmask, other=0.0)
    a = round_as(nw.to(tl.float32) * round_as(h * rstd, dt), dt)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w = tl.load(W + rn.to(tl.int64)[:, None] * swn + rk[None, :], mask=(rn[:, None] < N) & kmask[None, :], other=0.0)
    y = tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(OUT + m * som + rn, y.to(OUT.dtype.element_ty), mask=rn < N)


def launch_add_norm(x2, r2, norm_weight, eps, weight, block_n: int, num_warps: int):
    """``x2``, ``r2`` [M, K] (last dim contiguous), ``weight`` [N, K] contiguous -> (out [M, N], h [M, K])."""
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    h = torch.empty((m, k), dtype=x2.dtype, device=x2.device)
    if m and n and k:
        _add_norm_gemv_kernel[(triton.cdiv(n, block_n), m)](
            x2, r2, norm_weight, weight, out, h, n, k, x2.stride(0), r2.stride(0), h.stride(0), weight.stride(0),
            out.stride(0), eps, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k), num_warps=num_warps)
    return out, h


def add_rms_norm_linear_cuda(x, residual, norm_weight, eps, weight):
    """One kernel at one token where ``FUSED_SHAPES`` lists the projection (and the GEMV table has its tile);
    otherwise the two unfused ops (their own CUDA kernels), as before the fusion."""
    _check_add_rms_norm_linear(x, residual, norm_weight, weight)
    k = x.shape[-1]
    n = weight.shape[0]
    m = x.numel() // k if k else 0
    c = choose(m, n, k) if m == 1 else None
    usable = (c is not None and c.block_m == 1 and (n, k) in FUSED_SHAPES and x.dtype in _DTYPES and residual.dtype == x.dtype
              and norm_weight.dtype == x.dtype and norm_weight.stride(0) == 1 and k <= MAX_NORM_K
              and weight.stride(1) == 1 and weight.stride(0) == k)
    if not usable:
        normed, h = torch.ops.fxp.add_rms_norm.default(x, residual, norm_weight, eps)
        return torch.ops.fxp.linear.default(normed, weight, None), h
    x2 = x.reshape(m, k)
    r2 = residual.reshape(m, k)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    r2 = r2 if r2.stride(1) == 1 else r2.contiguous()
    warps = 8 if k > 2048 else 4
    out, h = launch_add_norm(x2, r2, norm_weight, eps, weight, c.block_n, warps)
    return out.view(*x.shape[:-1], n), h.view(x.shape)


def register() -> None:
    LIB.impl("linear", linear_cuda, "CUDA")
    LIB.impl("add_rms_norm_linear", add_rms_norm_linear_cuda, "CUDA")
