"""Triton kernels for ``fxp.linear`` at small token counts (M <= 32), bf16/fp16, weight ``[N, K]`` row-major, and
for the fused decode ops built on its 1-token GEMV.

At these sizes a projection reads its whole weight to do 2*M FLOPs per element: bandwidth is everything. Only the
split-K kernel splits K, and it reduces in the same launch:

- ``_gemv_body`` (M = 1), launched as ``_gemv_kernel`` (plain) or ``_fused_gemv_kernel`` (the fused ops): each
  program owns ``BLOCK_N`` output columns and walks the whole K in ``BLOCK_K`` steps, accumulating ``w * x``
  elementwise in float32 registers and summing once at the end. Small ``BLOCK_N`` gives enough programs to cover
  every SM even at N = 2048 (and K-contiguous loads of 16 bytes). Constexpr flags add an RMSNorm prologue (with or
  without the residual add; two-pass, or one-pass: ``NORM_ONE_PASS``, the sum of squares taken in the GEMV's own K
  walk and rstd applied to the dot products) and a SiLU-and-mul epilogue (the program also walks the matching rows
  of the up projection), so one kernel body serves ``linear``, ``rms_norm_linear``, ``add_rms_norm_linear``,
  ``linear_silu_mul`` and ``add_rms_norm_linear_silu_mul``.
- ``_gemv_rows_kernel`` (2 <= M <= 8): each weight tile multiplied with every row.
- ``_small_m_kernel`` (2 <= M <= 32): the same walk with ``tl.dot`` on an ``[BLOCK_M, BLOCK_K] x [BLOCK_K,
  BLOCK_N]`` tile (tokens padded to 16 or 32 rows, which costs no bandwidth), so the weight is still read once.
- ``_split_k_kernel`` (2 <= M <= 32): tensor cores as well (optionally swap-AB: the weight tile as the A
  operand), with K cut into splits so that even a 2048-column projection has a few programs per SM. The splits'
  float32 partials meet in a workspace and the last-arriving program of each column block (an int32 arrival
  counter) sums them in split order, so the result is the same bits every run; the counters reset themselves
  (``ops/arrival_counters.py``), so CUDA-graph replays need no memset.

All accumulate in float32 and round once to the output dtype (plus the bias in float32), as cuBLAS does, but in
a different order: results equal cuBLAS's within bf16 GEMM tolerance, not bit for bit. The two-pass prologue and
the epilogue round every intermediate where the unfused kernels round it (``round_as``), so the fused ops differ
from the unfused sequence only by that summation order; the one-pass prologue also skips the rounding of the
normalized row (rstd is known only at the end of the walk), so it differs by rounding order too (``_gemv_body``).

Every kernel here is launched with programmatic dependent launch where the GPU has it (``pdl_enabled``; off with
``FXPASSES_PDL=0``): it waits (``gdc_wait``) before reading anything another kernel may write, so the next
kernel's launch, and with the op's ``weight_stable`` (set by ``fxpasses.stable_weights`` where the graph proves
no kernel of the step writes the weight) the 1-token GEMV's first weight block, overlap the previous kernel's
tail. Same bits either way.

Which kernel and tile runs is decided per call from (M, N, K) by ``choose``: a table measured on an H200
(``benchmarks/gemm.py --sweep``); shapes and token counts it does not name go to cuBLAS, as do fp32, strided
weights and M above 32. The fused ops run their kernel at one token where it was measured faster
(``fused_config``: the SiLU-and-mul epilogue on every gate/up projection; the norm prologue only on the shapes
``NORM_ONE_PASS`` (one-pass) or ``NORM_FUSED`` (two-pass) lists), else their unfused kernels. Capture-safe: no host synchronization, no allocation but the
outputs and the split-K workspace (torch's caching allocator; a graph's pool under capture).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from fxpasses.ops import arrival_counters
from fxpasses.ops.library import LIB
from fxpasses.ops.linear import (
    _check_add_rms_norm_linear,
    _check_add_rms_norm_linear_silu_mul,
    _check_rms_norm_linear,
    check_linear,
    check_silu_mul_weights,
)
from fxpasses.ops.triton_rounding import round_as

logger = logging.getLogger(__name__)

MAX_M = 32
_DTYPES = (torch.bfloat16, torch.float16)
# Programmatic dependent launch (PDL) of every kernel here, on by default where it exists (sm_90+, not Triton's
# interpreter): "0" launches them the old way, for A/B runs (benchmarks/decode.py's "-nopdl" modes); "wait": PDL, every
# kernel waiting first (the "-waitfirst" modes); "1": PDL, and where the op's ``weight_stable`` is set the first weight
# block read before the wait (the "-prefetch" modes). Unset or empty: PDL_DEFAULT.
ENV_PDL = "FXPASSES_PDL"
PDL_VALUES = ("", "0", "1", "wait")
# H200, torch 2.11 / Triton 3.6, 2026-11-29, 1B decode step, full CUDA graphs, one run (benchmarks/decode.py --tokens
# 1 8 32): prefetch 0.84 / 0.98 / 1.04 ms, wait-first 0.87 / 1.03 / 1.08, no PDL 0.88 / 1.02 / 1.08 (reduce-overhead
# 1.08 / 1.11 / 1.16). An earlier run: wait-first 0.84, no PDL 0.85 at 1 token (run-to-run spread about 0.03 ms), and
# the first prefetch version, which picked the preloaded block inside the K loop, 0.96 (now peeled off the loop).
PDL_DEFAULT = "1"


def pdl_enabled(device: torch.device) -> bool:
    """Whether this module's kernels are launched with ``launch_pdl=True`` on ``device``.

    Why: at one token a projection's kernel costs about 2.2 µs of fixed time (launch, first-byte latency, the last
    wave's tail) on top of its bytes (docs/performance.md). With PDL the next kernel is launched while this one
    drains; each of our kernels calls ``gdc_wait`` before it reads anything another kernel may have written and
    ``gdc_launch_dependents`` right after, so results are the same bits as without it (and, where the op's
    ``weight_stable`` is set, its first weight block is already in flight when the wait returns). Off on CPU, under
    Triton's interpreter (which runs no PTX) and below compute capability 9.0 (no ``griddepcontrol``), and with
    ``FXPASSES_PDL=0``."""
    value = _pdl_setting()
    if value == "0" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return _capability(device) >= (9, 0)


def _pdl_setting() -> str:
    value = os.environ.get(ENV_PDL, "")
    if value not in PDL_VALUES:
        raise ValueError(f"{ENV_PDL}={value!r}: set it to 1 (programmatic dependent launch, the default), wait (PDL "
                         "without the weight prefetch) or 0 (launch the linear kernels the old way).")
    return value or PDL_DEFAULT


def _prefetch(pdl: bool, weight_stable: bool) -> bool:
    """Whether a PDL launch reads its first weight block before the wait (the caller proved the weight stable)."""
    return pdl and weight_stable and _pdl_setting() != "wait"


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _pdl_launch(pdl: bool) -> dict[str, bool]:
    """The launch option (only when on: Triton's interpreter takes no such keyword)."""
    return {"launch_pdl": True} if pdl else {}


@dataclass(frozen=True)
class Config:
    """One launch configuration. ``block_m`` 1 selects the GEMV kernel, 2..8 (a power of two, at least M) the
    several-rows GEMV, 16 or 32 the tl.dot kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    programs: int = 0  # fused 1-token GEMV only: persistent, this many programs per SM (0: one per column block)
    split: int = 0  # block_m 16/32 only: >= 1 selects the split-K kernel with (at most) this many K splits
    swap: bool = False  # split-K kernel only: W's tile is the dot's A operand (swap-AB), x^T the B operand
    one_pass: bool = False  # fused 1-token GEMV only: the one-pass norm prologue (see _gemv_body), not the two-pass

    def __str__(self) -> str:
        persistent = f"p{self.programs}" if self.programs else ""
        split = f"x{self.split}{'t' if self.swap else ''}" if self.split else ""
        one_pass = "-onepass" if self.one_pass else ""
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}{persistent}{split}"
                f"{one_pass}")


@triton.jit
def _row_chunk(ptrs, kmask, EVEN: tl.constexpr):
    """A chunk of a row (x, the residual, the norm weight) as float32: unmasked where K is a whole number of steps."""
    if EVEN:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.load(ptrs, mask=kmask, other=0.0).to(tl.float32)


@triton.jit
def _gemv_act(k0, kmask, nb, X, R, NW, ROUT, sxm, srm, srom, m, rstd, arow, squares, rk, dt: tl.constexpr,
              NORM: tl.constexpr, NORM_ONE_PASS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN: tl.constexpr,
              ROW_IN_REGS: tl.constexpr):
    """The activation chunk ``a`` at ``k0`` that the weight block multiplies (x, or its norm), and the one-pass
    prologue's running sum of squares (see _gemv_body)."""
    if ROW_IN_REGS:  # one step covers the row: normalized once per program, before the first block
        a = arow
    else:
        if EVEN:
            a = tl.load(X + m * sxm + k0 + rk).to(tl.float32)
        else:
            a = tl.load(X + m * sxm + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
        if NORM and NORM_ONE_PASS:
            if HAS_RESIDUAL:  # eager's add; its output written once per row, by the program of column block 0
                a = round_as(a + _row_chunk(R + m * srm + k0 + rk, kmask, EVEN), dt)
                tl.store(ROUT + m * srom + k0 + rk, a.to(ROUT.dtype.element_ty), mask=kmask & (nb == 0))
            squares += a * a
            a = _row_chunk(NW + k0 + rk, kmask, EVEN) * a  # rstd unknown yet: g * h, unrounded
        else:
            if HAS_RESIDUAL:
                a = round_as(a + tl.load(R + m * srm + k0 + rk, mask=kmask, other=0.0).to(tl.float32), dt)
            if NORM:
                nw = tl.load(NW + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
                a = round_as(nw * round_as(a * rstd, dt), dt)
    return a, squares


@triton.jit
def _gemv_block(nb, X, R, NW, W, W2, B, OUT, ROUT, N, K, sxm, srm, srom, swn, som, m, eps, rstd, arow,
                NORM: tl.constexpr, NORM_ONE_PASS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                SILU_MUL: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                ROW_IN_REGS: tl.constexpr, PDL_WAIT: tl.constexpr, PREFETCH: tl.constexpr):
    """Output columns ``nb * BLOCK_N ...`` of row ``m``: the K walk, the epilogue and the store (see _gemv_body).
    ``rstd`` / ``arow``: the two-pass prologue's results; the one-pass prologue (``NORM_ONE_PASS``) makes its own
    from ``eps``.

    ``PDL_WAIT`` (programmatic dependent launch, see ``pdl_enabled``): ``gdc_wait`` before the first read of
    anything another kernel may write (x, the residual, the norm weight, the bias; the output), then
    ``gdc_launch_dependents`` so the next kernel's launch overlaps this one's tail. ``PREFETCH`` (the op's
    ``weight_stable``, which ``fxpasses.stable_weights`` sets only where the graph shows that no kernel of the step
    writes ``W`` / ``W2``): the first ``BLOCK_K`` block of this program's weight rows is loaded *before* the wait,
    so its DRAM latency overlaps the previous kernel's tail, and multiplied right after it; the loop then walks the
    rest (the first step peeled off: a loop that picks the preloaded block on its first trip kept it live across
    the loop and measured 20% slower than no PDL on the H200).
    """
    dt: tl.constexpr = X.dtype.element_ty
    rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn.to(tl.int64)[:, None] * swn + rk[None, :]
    w2_ptrs = W2 + rn.to(tl.int64)[:, None] * swn + rk[None, :]
    if PREFETCH:  # the weight is never written in the step: safe to read before the wait
        first_mask = (rn[:, None] < N) & (rk[None, :] < K)
        if EVEN:
            w_first = tl.load(w_ptrs)
        else:
            w_first = tl.load(w_ptrs, mask=first_mask, other=0.0)
        if SILU_MUL:
            if EVEN:
                w2_first = tl.load(w2_ptrs)
            else:
                w2_first = tl.load(w2_ptrs, mask=first_mask, other=0.0)
    if PDL_WAIT:
        gdc_wait()
        gdc_launch_dependents()
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)  # NORM_ONE_PASS: the row's sum of squares, per lane
    if PREFETCH:  # the first step, on the preloaded block
        a, squares = _gemv_act(0, rk < K, nb, X, R, NW, ROUT, sxm, srm, srom, m, rstd, arow, squares, rk, dt, NORM,
                               NORM_ONE_PASS, HAS_RESIDUAL, EVEN, ROW_IN_REGS)
        acc += w_first.to(tl.float32) * a[None, :]
        if SILU_MUL:
            acc2 += w2_first.to(tl.float32) * a[None, :]
    for k0 in range(BLOCK_K if PREFETCH else 0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        wmask = (rn[:, None] < N) & kmask[None, :]
        if EVEN:
            w = tl.load(w_ptrs + k0)
        else:
            w = tl.load(w_ptrs + k0, mask=wmask, other=0.0)
        a, squares = _gemv_act(k0, kmask, nb, X, R, NW, ROUT, sxm, srm, srom, m, rstd, arow, squares, rk, dt, NORM,
                               NORM_ONE_PASS, HAS_RESIDUAL, EVEN, ROW_IN_REGS)
        acc += w.to(tl.float32) * a[None, :]
        if SILU_MUL:
            if EVEN:
                w2 = tl.load(w2_ptrs + k0)
            else:
                w2 = tl.load(w2_ptrs + k0, mask=wmask, other=0.0)
            acc2 += w2.to(tl.float32) * a[None, :]
    y = tl.sum(acc, axis=1)
    if NORM and NORM_ONE_PASS:  # rstd factors out of the dot product: applied once, in float32, before any rounding
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        y = y * rstd
    if HAS_BIAS:
        y += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)
    if SILU_MUL:
        gate = round_as(y, dt)
        up = tl.sum(acc2, axis=1)
        if NORM and NORM_ONE_PASS:
            up = up * rstd
        up = round_as(up, dt)
        y = round_as(gate / (1.0 + tl.exp(-gate)), dt) * up
    tl.store(OUT + m * som + rn, y.to(OUT.dtype.element_ty), mask=rn < N)


@triton.jit
def _gemv_body(X, R, NW, W, W2, B, OUT, ROUT, N, K, sxm, srm, srom, swn, som, eps, NORM: tl.constexpr,
               NORM_ONE_PASS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
               SILU_MUL: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_ROW: tl.constexpr, ROW_IN_REGS: tl.constexpr, PERSISTENT: tl.constexpr, PDL_TOP: tl.constexpr,
               PDL_WAIT: tl.constexpr, PREFETCH: tl.constexpr):
    """Program (n-block, row m) of the 1-token GEMV, with an optional prologue and epilogue (constexpr flags).

    Each program owns ``BLOCK_N`` output columns and walks the whole K in ``BLOCK_K`` steps, accumulating
    ``w * a`` elementwise in float32 registers and summing once at the end.

    ``NORM`` (prologue, two-pass): ``a`` is the row's RMSNorm, not ``x``. A first pass over the whole row
    (``BLOCK_ROW`` = K rounded up to a power of two, a few KB from L2) gives the float32 ``rstd``; the K walk then
    recomputes each chunk of the normalized row, rounded exactly as ``ops/triton_kernels.py``'s norm kernel rounds
    it (``round_as(w * round_as(h * rstd))``). With ``HAS_RESIDUAL``, ``h = x + r`` rounded to the dtype (eager's
    add) and program 0 of the row writes it to ``ROUT``. ``ROW_IN_REGS`` (``BLOCK_K == BLOCK_ROW``: one step
    covers the row) normalizes the row once in registers instead of loading x (and r) again per block.

    ``NORM`` with ``NORM_ONE_PASS`` (prologue, one pass): no first pass. ``RMSNorm(h) . W[n] = rstd * sum_k W[n, k]
    * g[k] * h[k]`` with ``rstd = 1 / sqrt(sum_k h[k]^2 / K + eps)``: rstd factors out of the dot product, so
    the K walk accumulates ``w * (g * h)`` and, from the same chunk loads, ``h^2``, and the program multiplies its
    float32 sums by rstd once at the end (for SiLU-and-mul both gate and up), before any rounding. The program's
    first weight load no longer waits for a pass over the row. With ``HAS_RESIDUAL``, ``h`` is ``x + r`` rounded
    to the dtype per chunk (eager's add, bit for bit) and the program of column block 0 stores it to ``ROUT`` as it
    walks. Numerics: not bit-identical to the norm kernel followed by the GEMV. Eager (and the two-pass prologue)
    rounds the normalized row to the dtype before the projection, ``a = round(g * round(h * rstd))``, and rounds
    the product ``round(sum_k W * a)``; the one-pass prologue keeps ``g * h`` in float32 and rounds once,
    ``round(rstd * sum_k W * (g * h))``. The difference is rounding order only (two fewer roundings per element,
    so closer to the exact result, as the GEMV already differs from cuBLAS by its summation order): results equal
    the unfused kernels within bf16 GEMM tolerance and are within the GEMV's relative error of a float64
    reference, not bit for bit. ``rstd``'s float32 sum of squares is summed per chunk lane, then across lanes
    (another order than the norm kernel's single reduction). ``ROW_IN_REGS`` does not apply (it is False).

    ``PERSISTENT``: the grid has fewer programs than column blocks and each program walks blocks ``pid, pid + P,
    ...``, so the two-pass prologue's cost (the row's loads and, with ``ROW_IN_REGS``, its normalization) is paid
    once per program, not once per block (the one-pass prologue works per block either way).

    ``SILU_MUL`` (epilogue): the program also accumulates the same columns of ``W2`` (the up projection), rounds
    both products to the dtype (the unfused GEMM's stores) and writes ``silu(gate) * up`` with silu rounded to the
    dtype, as ``fxp.silu_and_mul``'s kernel does.

    Programmatic dependent launch: ``PDL_TOP`` waits (``gdc_wait``) first thing, where the program reads x before
    its first weight block (the two-pass prologue) or walks several blocks (``PERSISTENT``); otherwise ``PDL_WAIT``
    / ``PREFETCH`` wait inside ``_gemv_block``, after the first weight block's load where the weight is stable.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    if PDL_TOP:
        gdc_wait()
        gdc_launch_dependents()
    if NORM and not NORM_ONE_PASS:
        dt = X.dtype.element_ty
        rr = tl.arange(0, BLOCK_ROW)
        hrow = tl.load(X + m * sxm + rr, mask=rr < K, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            hrow = round_as(hrow + tl.load(R + m * srm + rr, mask=rr < K, other=0.0).to(tl.float32), dt)
            if pid_n == 0:
                tl.store(ROUT + m * srom + rr, hrow.to(ROUT.dtype.element_ty), mask=rr < K)
        rstd = 1.0 / tl.sqrt(tl.sum(hrow * hrow, axis=0) / K + eps)
        if ROW_IN_REGS:
            nw = tl.load(NW + rr, mask=rr < K, other=0.0).to(tl.float32)
            _gemv_blocks(pid_n, X, R, NW, W, W2, B, OUT, ROUT, N, K, sxm, srm, srom, swn, som, m, eps, rstd,
                         round_as(nw * round_as(hrow * rstd, dt), dt), NORM, NORM_ONE_PASS, HAS_RESIDUAL, HAS_BIAS,
                         SILU_MUL, EVEN, BLOCK_N, BLOCK_K, ROW_IN_REGS, PERSISTENT, PDL_WAIT, PREFETCH)
        else:
            _gemv_blocks(pid_n, X, R, NW, W, W2, B, OUT, ROUT, N, K, sxm, srm, srom, swn, som, m, eps, rstd, rstd,
                         NORM, NORM_ONE_PASS, HAS_RESIDUAL, HAS_BIAS, SILU_MUL, EVEN, BLOCK_N, BLOCK_K, ROW_IN_REGS,
                         PERSISTENT, PDL_WAIT, PREFETCH)
    else:
        _gemv_blocks(pid_n, X, R, NW, W, W2, B, OUT, ROUT, N, K, sxm, srm, srom, swn, som, m, eps, 0.0, 0.0, NORM,
                     NORM_ONE_PASS, HAS_RESIDUAL, HAS_BIAS, SILU_MUL, EVEN, BLOCK_N, BLOCK_K, ROW_IN_REGS, PERSISTENT,
                     PDL_WAIT, PREFETCH)


@triton.jit
def _gemv_blocks(pid_n, X, R, NW, W, W2, B, OUT, ROUT, N, K, sxm, srm, srom, swn, som, m, eps, rstd, arow,
                 NORM: tl.constexpr, NORM_ONE_PASS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROW_IN_REGS: tl.constexpr, PERSISTENT: tl.constexpr, PDL_WAIT: tl.constexpr,
                 PREFETCH: tl.constexpr):
    """This program's column block, or with ``PERSISTENT`` every ``num_programs``-th block from it (the launcher
    then waits in ``_gemv_body``: ``PDL_WAIT`` and ``PREFETCH`` are False)."""
    if PERSISTENT:
        for nb in range(pid_n, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
            _gemv_block(nb, X, R, NW, W, W2, B, OUT, ROUT, N, K, sxm, srm, srom, swn, som, m, eps, rstd, arow, NORM,
                        NORM_ONE_PASS, HAS_RESIDUAL, HAS_BIAS, SILU_MUL, EVEN, BLOCK_N, BLOCK_K, ROW_IN_REGS, False,
                        False)
    else:
        _gemv_block(pid_n, X, R, NW, W, W2, B, OUT, ROUT, N, K, sxm, srm, srom, swn, som, m, eps, rstd, arow, NORM,
                    NORM_ONE_PASS, HAS_RESIDUAL, HAS_BIAS, SILU_MUL, EVEN, BLOCK_N, BLOCK_K, ROW_IN_REGS, PDL_WAIT,
                    PREFETCH)


@triton.jit
def _gemv_kernel(X, W, B, OUT, N, K, sxm, swn, som, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL_WAIT: tl.constexpr = False,
                 PREFETCH: tl.constexpr = False):
    """``fxp.linear`` at one token: the GEMV without prologue or epilogue (one column block per program)."""
    _gemv_block(tl.program_id(0), X, X, X, W, W, B, OUT, OUT, N, K, sxm, 0, 0, swn, som,
                tl.program_id(1).to(tl.int64), 0.0, 0.0, 0.0, False, False, False, HAS_BIAS, False, EVEN, BLOCK_N,
                BLOCK_K, False, PDL_WAIT, PREFETCH)


@triton.jit
def _fused_gemv_kernel(X, R, NW, W, W2, OUT, ROUT, N, K, sxm, srm, srom, swn, som, eps, NORM: tl.constexpr,
                       NORM_ONE_PASS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
                       EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_ROW: tl.constexpr,
                       ROW_IN_REGS: tl.constexpr, PERSISTENT: tl.constexpr, PDL_TOP: tl.constexpr = False,
                       PDL_WAIT: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """The fused ops at one token: the same GEMV with the norm prologue (two-pass, or ``NORM_ONE_PASS``) and/or the
    SiLU-and-mul epilogue (its own name, so a profiler's kernel census tells the fused launches from plain ones)."""
    _gemv_body(X, R, NW, W, W2, OUT, OUT, ROUT, N, K, sxm, srm, srom, swn, som, eps, NORM, NORM_ONE_PASS,
               HAS_RESIDUAL, False, SILU_MUL, EVEN, BLOCK_N, BLOCK_K, BLOCK_ROW, ROW_IN_REGS, PERSISTENT, PDL_TOP,
               PDL_WAIT, PREFETCH)


@triton.jit
def _gemv_rows_kernel(X, W, B, OUT, M, N, K, sxm, swn, som, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL_WAIT: tl.constexpr = False):
    """GEMV for 2..8 rows: each weight tile is loaded once and multiplied with every row of x. ``PDL_WAIT``:
    programmatic dependent launch, waiting first (see ``_gemv_block``)."""
    if PDL_WAIT:
        gdc_wait()
        gdc_launch_dependents()
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
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL_WAIT: tl.constexpr = False):
    if PDL_WAIT:  # programmatic dependent launch, waiting first (see _gemv_block)
        gdc_wait()
        gdc_launch_dependents()
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


@triton.jit
def _split_w_tile(w_ptrs, k0, k_hi, rk, EVEN_K: tl.constexpr, SWAP: tl.constexpr):
    """The split-K kernel's weight tile at ``k0`` (``w_ptrs`` already there), masked past ``k_hi``."""
    if EVEN_K:
        w = tl.load(w_ptrs)
    else:
        kmask = (k0 + rk) < k_hi
        if SWAP:
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
    return w


@triton.jit
def _split_step(w, x_ptrs, k0, k_hi, rk, rm, M, acc, EVEN_K: tl.constexpr, SWAP: tl.constexpr):
    """One K step of the split-K kernel on the weight tile ``w``: x's tile (rows past M zero-filled without a
    read) and the tensor-core product."""
    if EVEN_K:
        if SWAP:
            x = tl.load(x_ptrs, mask=rm[None, :] < M, other=0.0)
        else:
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
    else:
        kmask = (k0 + rk) < k_hi
        if SWAP:
            x = tl.load(x_ptrs, mask=kmask[:, None] & (rm[None, :] < M), other=0.0)
        else:
            x = tl.load(x_ptrs, mask=kmask[None, :] & (rm[:, None] < M), other=0.0)
    if SWAP:
        acc = tl.dot(w, x, acc)
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _split_k_kernel(X, W, B, OUT, WS, CNT, M, N, K, sxm, swn, som, k_per_split, HAS_BIAS: tl.constexpr,
                    EVEN_K: tl.constexpr, SPLITS: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL_WAIT: tl.constexpr = False,
                    PREFETCH: tl.constexpr = False):
    """Program (column block, K split) of the split-K small-M GEMM (see ``launch_split_k``).

    The program multiplies x's rows (padded to ``BLOCK_M``) with ``BLOCK_N`` weight rows over its ``k_per_split``
    columns of K on tensor cores: ``x [BLOCK_M, BLOCK_K] @ W^T [BLOCK_K, BLOCK_N]``, or with ``SWAP``
    ``W [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M]`` (the weight tile as the A operand, whose M dimension can
    be 64 or more, where Hopper's warpgroup MMA needs it). Weight rows past N are clamped to the last row for the
    loads (unmasked, full-width weight loads) and never stored; x's rows past M are masked (zero-filled without a
    memory read).

    ``SPLITS`` (the grid's second dimension, a constexpr so that the reduction's loads unroll and issue together)
    1: the program owns the whole K and stores its tile. Otherwise it writes its float32 partial to
    ``WS[split]``, then takes a ticket from the column block's arrival counter ``CNT[pid_n]`` (an int32
    ``atomic_add``, acq_rel at GPU scope, after a CTA barrier so every thread's partial stores precede the
    release). The program that draws the last ticket sums the partials in split order 0..S-1 (loaded through L2,
    ``.cg``, after its acquire), adds the bias, rounds once, stores, and puts the counter back to 0, so the next
    launch (and every CUDA-graph replay) finds it zeroed. The sum's order does not depend on which program
    arrives last: the output is bit-identical run to run.

    ``PDL_WAIT``: programmatic dependent launch (see ``_gemv_block``): x, the bias, the workspace and the counters
    are touched only after the wait, so a launch that overlaps the previous split-K launch's tail never sees its
    counters or partials; nothing is read before it either, except with ``PREFETCH`` (the op's ``weight_stable``)
    the program's first weight tile.
    """
    if PDL_WAIT and not PREFETCH:
        gdc_wait()
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm_ld = rm.to(tl.int64)
    rn_ld = tl.minimum(rn, N - 1).to(tl.int64)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if SWAP:
        w_ptrs = W + rn_ld[:, None] * swn + (k_lo + rk)[None, :]  # [BLOCK_N, BLOCK_K]
        x_ptrs = X + rm_ld[None, :] * sxm + (k_lo + rk)[:, None]  # [BLOCK_K, BLOCK_M]: x^T
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        w_ptrs = W + rn_ld[None, :] * swn + (k_lo + rk)[:, None]  # [BLOCK_K, BLOCK_N]: W^T, K contiguous
        x_ptrs = X + rm_ld[:, None] * sxm + (k_lo + rk)[None, :]  # [BLOCK_M, BLOCK_K]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PREFETCH:  # the weight is never written in the step: its first tile is read before the wait, used after it
        w_first = _split_w_tile(w_ptrs, k_lo, k_hi, rk, EVEN_K, SWAP)
        if PDL_WAIT:
            gdc_wait()
            gdc_launch_dependents()
        acc = _split_step(w_first, x_ptrs, k_lo, k_hi, rk, rm, M, acc, EVEN_K, SWAP)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    for k0 in range(k_lo + BLOCK_K if PREFETCH else k_lo, k_hi, BLOCK_K):  # the first step peeled (_gemv_block)
        w = _split_w_tile(w_ptrs, k0, k_hi, rk, EVEN_K, SWAP)
        acc = _split_step(w, x_ptrs, k0, k_hi, rk, rm, M, acc, EVEN_K, SWAP)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if SWAP:  # [BLOCK_N, BLOCK_M] tile: offsets and mask in the same orientation
        ws_offs = rm[None, :] * N + rn[:, None]
        out_offs = rm.to(tl.int64)[None, :] * som + rn[:, None]
        mask = (rm[None, :] < M) & (rn[:, None] < N)
    else:
        ws_offs = rm[:, None] * N + rn[None, :]
        out_offs = rm.to(tl.int64)[:, None] * som + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:  # loaded before the reduction branch (a few hundred bytes, from L2)
        bias = tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)
        if SWAP:
            bias_tile = bias[:, None]
        else:
            bias_tile = bias[None, :]
    if SPLITS == 1:
        y = acc
        if HAS_BIAS:
            y += bias_tile
        tl.store(OUT + out_offs, y.to(OUT.dtype.element_ty), mask=mask)
    else:
        plane = M * N
        tl.store(WS + pid_s * plane + ws_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial stores, then one release at GPU scope
        ticket = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLITS - 1:
            y = tl.load(WS + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLITS):
                y += tl.load(WS + s * plane + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += bias_tile
            tl.store(OUT + out_offs, y.to(OUT.dtype.element_ty), mask=mask)
            tl.atomic_xchg(CNT + pid_n, 0, sem="relaxed", scope="gpu")  # zeroed for the next launch / replay


def split_plan(k: int, block_k: int, split: int) -> tuple[int, int]:
    """``(splits, k_per_split)``: K cut into at most ``split`` runs of whole ``block_k`` steps, none empty."""
    steps = triton.cdiv(k, block_k)
    per = triton.cdiv(steps, max(1, min(split, steps)))
    return triton.cdiv(steps, per), per * block_k


def launch_split_k(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: Config,
                   out: torch.Tensor, pdl: bool | None = None, weight_stable: bool = False) -> torch.Tensor:
    """``_split_k_kernel`` on ``x2 [M, K]`` (M <= ``config.block_m``, K > 0, last dim contiguous), ``weight [N, K]``
    contiguous, into ``out [M, N]``. Grid: column blocks x K splits; with more than one split, an ``[S, M, N]``
    float32 workspace from torch's caching allocator (capture-safe: under a CUDA graph it comes from the graph's
    pool) and a run of the device's arrival counters (``arrival_counters.take``). ``pdl`` None: ``pdl_enabled``;
    ``weight_stable`` as in ``launch``."""
    pdl = pdl_enabled(out.device) if pdl is None else pdl
    m, k = x2.shape
    n = weight.shape[0]
    c = config
    if m > c.block_m:
        raise ValueError(f"triton_linear.launch: {c} covers at most {c.block_m} rows, x has {m}.")
    if min(c.block_m, c.block_n, c.block_k) < 16 or any(b & (b - 1) for b in (c.block_m, c.block_n, c.block_k)):
        raise ValueError(f"triton_linear.launch: the split-K kernel's {c} needs block_m, block_n and block_k powers "
                         "of two of at least 16 (tl.dot's smallest tile).")
    tiles = triton.cdiv(n, c.block_n)
    splits, per = split_plan(k, c.block_k, c.split)
    counters = arrival_counters.take(out.device, tiles, "fxp.linear's split-K kernel") if splits > 1 else None
    if counters is None:
        splits, per = 1, triton.cdiv(k, c.block_k) * c.block_k
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=out.device) if splits > 1 else out
    _split_k_kernel[(tiles, splits)](
        x2, weight, bias if bias is not None else out, out, ws, counters if counters is not None else out, m, n, k,
        x2.stride(0), weight.stride(0), out.stride(0), per, HAS_BIAS=bias is not None, EVEN_K=k % c.block_k == 0,
        SPLITS=splits, SWAP=c.swap, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, PDL_WAIT=pdl,
        PREFETCH=_prefetch(pdl, weight_stable),
        num_warps=c.num_warps, num_stages=c.num_stages, **_pdl_launch(pdl))
    return out


def launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: Config,
           out: torch.Tensor | None = None, *, pdl: bool | None = None, weight_stable: bool = False) -> torch.Tensor:
    """Run one kernel on ``x2 [M, K]`` (last dim contiguous) and ``weight [N, K]`` (contiguous) with ``config``.
    Public for the benchmark's sweep and the tests; ``linear_cuda`` is what the op calls. ``pdl``: launch with
    programmatic dependent launch (None: ``pdl_enabled``); ``weight_stable``: the caller guarantees no kernel of the
    step writes ``weight``, so the 1-token GEMV and the split-K kernel read their first weight block before the PDL
    wait."""
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
    pdl = pdl_enabled(out.device) if pdl is None else pdl
    common = dict(HAS_BIAS=bias is not None, EVEN=even, BLOCK_N=c.block_n, BLOCK_K=c.block_k, PDL_WAIT=pdl,
                  num_warps=c.num_warps, num_stages=c.num_stages, **_pdl_launch(pdl))
    if c.block_m == 1:
        _gemv_kernel[(triton.cdiv(n, c.block_n), m)](x2, weight, b, out, n, k, x2.stride(0), weight.stride(0),
                                                     out.stride(0), PREFETCH=_prefetch(pdl, weight_stable), **common)
        return out
    if c.split:
        return launch_split_k(x2, weight, bias, c, out, pdl=pdl, weight_stable=weight_stable)
    if c.block_m <= 8:
        if m > c.block_m:
            raise ValueError(f"triton_linear.launch: {c} covers at most {c.block_m} rows, x has {m}.")
        kernel, grid = _gemv_rows_kernel, (triton.cdiv(n, c.block_n),)
    else:
        kernel, grid = _small_m_kernel, (triton.cdiv(n, c.block_n), triton.cdiv(m, c.block_m))
    kernel[grid](x2, weight, b, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0), BLOCK_M=c.block_m,
                 **common)
    return out


def default_config(m: int, n: int, k: int) -> Config:
    """A tile for any shape: what the sweep found good across the Llama shapes (see ``choose`` for the table)."""
    if m == 1:
        return Config(1, 4, 1024, 4, 1)
    if m <= 8:
        return Config(triton.next_power_of_2(m), 2, 512, 4, 1)
    return Config(16 if m <= 16 else 32, 32, 256, 4, 4)


# (M bucket, N, K) -> Config, measured at least 2% faster than cuBLAS on an H200, torch 2.11 / Triton 3.6,
# 2026-11-29 (benchmarks/gemm.py --sweep; per-call µs in the comments, cuBLAS's in parentheses). M = 1 and the
# M = 8 / 16 entries of the 8B down projection: two runs. The split-K entries (``split=``): one run, the quick
# sweep (``--kernels split --quick``), where each beat both cuBLAS and the entry it replaces (8B q/o: 11.58 vs
# 11.91 at M = 8, 12.35 vs 13.11 at M = 32). Shapes and buckets not listed use cuBLAS: the Triton kernels run only
# where they were measured to win (the split-K kernel lost on 1B qkv, 1B gate_up at M = 32 and 8B gate_up,
# gate/up). The shapes are Llama-3.2-1B's and Llama-3-8B's projections ([N, K] = [out, in]; qkv and gate_up
# fused as fxpasses.models builds them). 9..16 rows take the 8-row entry where it is a 16-row tile (``choose``).
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
    (8, 512, 2048): Config(16, 32, 256, 4, 4, split=8),  # 4.33 (5.76; the 8-row GEMV 4.49)
    (8, 1024, 4096): Config(16, 64, 128, 4, 5, split=8, swap=True),  # 5.97 (7.81)
    (8, 2048, 2048): Config(16, 64, 128, 4, 5, split=4, swap=True),  # 5.73 (6.16)
    (8, 2048, 8192): Config(16, 64, 128, 4, 5, split=4, swap=True),  # 11.79 (14.20)
    (8, 4096, 4096): Config(16, 64, 128, 4, 5, split=2, swap=True),  # 11.58 (13.50)
    (8, 4096, 14336): Config(16, 32, 256, 4, 5),  # 31.52 (32.33); split-K 31.76, this tile 31.69 in its run
    (8, 6144, 4096): Config(16, 64, 128, 4, 5, split=1, swap=True),  # 15.24 (16.27)
    (8, 8192, 2048): Config(16, 64, 128, 4, 5, split=1, swap=True),  # 10.58 (11.30)
    (8, 16384, 2048): Config(16, 64, 128, 4, 5, split=1, swap=True),  # 19.06 (19.54): 2.5%, within run-to-run noise
    (16, 4096, 14336): Config(16, 32, 256, 4, 5),  # 31.61 (33.04 at M = 8)
    (32, 512, 2048): Config(32, 16, 512, 4, 4, split=4),  # 4.80 (5.79)
    (32, 1024, 4096): Config(32, 64, 128, 4, 5, split=8, swap=True),  # 6.89 (8.03)
    (32, 2048, 2048): Config(32, 16, 256, 4, 6, split=1),  # 5.83 (6.30)
    (32, 2048, 8192): Config(32, 64, 128, 4, 5, split=4, swap=True),  # 12.73 (14.71)
    (32, 4096, 4096): Config(32, 64, 128, 4, 5, split=2, swap=True),  # 12.35 (14.10)
    (32, 4096, 14336): Config(32, 64, 128, 4, 5, split=2, swap=True),  # 32.58 (34.52)
    (32, 6144, 4096): Config(32, 64, 128, 4, 5, split=1, swap=True),  # 15.64 (16.60)
    (32, 8192, 2048): Config(32, 64, 128, 4, 5, split=1, swap=True),  # 11.02 (11.64)
}


def _bucket(m: int) -> int:
    return 1 if m == 1 else 8 if m <= 8 else 16 if m <= 16 else 32


def choose(m: int, n: int, k: int) -> Config | None:
    """The Triton configuration for this call, or None for cuBLAS. The table is measured at M = 1, 8 and 32;
    2..8 rows use the 8-row entry (with the rows rounded up to a power of two: a bandwidth-bound kernel is no
    slower with fewer rows), 9..16 the 16-row one where there is one, else the 8-row one if that is a 16-row
    tensor-core tile (the rows are padded to 16 either way)."""
    if m < 1 or m > MAX_M:
        return None
    c = TABLE.get((_bucket(m), n, k))
    if c is None and _bucket(m) == 16:  # a 16-row dot tile measured at 8 rows does the same work at 9..16
        c8 = TABLE.get((8, n, k))
        c = c8 if c8 is not None and c8.block_m == 16 else None
    if c is not None and 1 < m <= 8 and 1 < c.block_m <= 8:
        c = dataclasses.replace(c, block_m=triton.next_power_of_2(m))
    return c


def linear_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                weight_stable: bool = False) -> torch.Tensor:
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
    return launch(x2, weight, bias, config, weight_stable=weight_stable).view(*x.shape[:-1], n)


# ---- the fused ops: RMSNorm prologue and/or SiLU-and-mul epilogue (one token) -------------------------------
MAX_NORM_K = 8192  # the norm prologue's first pass holds the whole row in registers
# At one token the SiLU-and-mul epilogue runs fused for every gate/up projection of at most this many weight
# elements (the largest decoder projection of the models measured, Llama-3-8B's gate_up, is 117M; every TP shard
# is smaller), with the GEMV table's tile where it has one, else the default tile. Larger weights are LM heads
# (128256 x 2048 and up), where cuBLAS already streams at the copy bandwidth.
MAX_FUSED_ELEMENTS = 1 << 27
# (N, K) of gate/up projections (N the activation width I) where the fused SiLU-and-mul epilogue measured slower
# than fxp.linear + fxp.silu_and_mul: they run unfused. None so far (H200, 2026-11-29, benchmarks/gemm.py --fused:
# 1B gate_up 21.0 us fused vs 22.4 unfused with the norm kernel in both, 8B 60.1 vs 66.9, 8B at TP 2 33.7 vs 35.1).
UNFUSED_SILU: set[tuple[int, int]] = set()
# The norm prologue runs fused only where it was measured faster than the norm kernel + the projection, as
# ("norm" | "silu", N, K) ("norm": rms_norm_linear / add_rms_norm_linear, N the projection's columns; "silu":
# add_rms_norm_linear_silu_mul, N the activation width). Every program recomputes the row's norm (the row loaded
# twice from L2, the normalization once per program), which at 2-4 columns per program costs more than the norm
# kernel it saves: same run, 1B qkv 7.27 us fused vs 7.00, 8B qkv 20.5 vs 17.6, gate_up + SiLU 0.80-0.84x of
# add_rms_norm + linear_silu_mul. The one win: 8B qkv at TP 2, whose unfused projection is cuBLAS (no table tile).
NORM_FUSED: set[tuple[str, int, int]] = {("norm", 3072, 4096)}  # 11.56 us vs 14.27
# The one-pass norm prologue (``_gemv_body``: the sum of squares accumulated in the GEMV's own K walk, rstd applied
# to the dot products at the end, no pass over the row first), keyed like NORM_FUSED, with the tile measured best for
# it (``benchmarks/gemm.py --fused --onepass-tiles`` prints these entries; the Config's block_n counts output
# columns, so for "silu" each program would read 2 * block_n weight rows). Listed only where it beat the best the op
# ran before (norm kernel + our GEMV or cuBLAS, or the two-pass kernel) by at least 2%; it takes precedence over
# NORM_FUSED. Not bit-identical to the norm kernel + GEMV (see _gemv_body): closer to a float64 reference than the
# unfused kernels (tests/test_linear_onepass_norm.py). H200, torch 2.11 / Triton 3.6, 2026-11-29, one run of the
# search (31 tiles per shape), us per call, the op's previous choice in parentheses. Not on gate_up + SiLU-and-mul,
# where the best one-pass tile lost to the norm kernel + linear_silu_mul: 1B 21.78 vs 20.88, 8B 64.91 vs 59.58,
# 8B at TP 2 36.49 vs 33.32 (each program reloads x, the residual and the norm weight from L2 for 2-8 of the 16384+
# gate/up columns).
NORM_ONE_PASS: dict[tuple[str, int, int], Config] = {
    ("norm", 3072, 2048): Config(1, 8, 1024, 4, 1, one_pass=True),  # 1B qkv: 5.97 (norm kernel + GEMV 6.98)
    ("norm", 6144, 4096): Config(1, 8, 512, 2, 1, one_pass=True),  # 8B qkv: 15.85 (17.31)
    ("norm", 3072, 4096): Config(1, 8, 1024, 4, 1, one_pass=True),  # 8B qkv at TP 2: 9.20 (two-pass kernel 11.34)
}
ENV_OFF = "FXPASSES_UNFUSED_GEMV"  # "1": every fused op runs its unfused kernels (A/B timings); "norm": the two-pass
# norm prologue wherever the kernel can take it, not only on NORM_FUSED's shapes, with NORM_TRIAL's tile (to measure
# that design in a whole decode step; NORM_ONE_PASS ignored); "onepass": the one-pass norm prologue wherever the
# kernel can take it (NORM_ONE_PASS's tile where it lists the shape, else the GEMV's tile), for whole-step A/B runs;
# "twopass": the policy without NORM_ONE_PASS (the norm kernel, or the two-pass prologue on NORM_FUSED's shapes), the
# "before" of a whole-step A/B run of the one-pass prologue
ENV_VALUES = ("", "0", "norm", "onepass", "twopass")
# A persistent grid with the whole row in one K step, so each program normalizes the row once (4 programs per SM)
# instead of once per 2-4 columns, for rows up to 4096 (Llama-3-8B's hidden size). Measured slower than the norm
# kernel + GEMV too (gemm.py --fused --fused-tiles, H200, 2026-11-29: 1B qkv 7.67 vs 7.05 us, 8B qkv 19.59 vs
# 17.41; docs/performance.md), so it runs only when forced.
NORM_TRIAL = dict(block_n=2, num_warps=8, num_stages=2, programs=4)


def fused_config(m: int, n: int, k: int, silu_mul: bool, norm: bool = False) -> Config | None:
    """The 1-token GEMV tile for a fused op whose output has ``n`` columns (``silu_mul``: the activation width; the
    program then reads ``2 * block_n`` weight rows; ``norm``: with the RMSNorm prologue), or None where that op
    runs its unfused kernels (the norm prologue's op then runs the norm kernel and, for SiLU, ``linear_silu_mul``).
    With ``norm``: the one-pass prologue (``one_pass`` set) on NORM_ONE_PASS's shapes, or everywhere with
    ``FXPASSES_UNFUSED_GEMV=onepass`` (``twopass``: never); else the two-pass prologue on NORM_FUSED's shapes, or
    everywhere with ``FXPASSES_UNFUSED_GEMV=norm`` (rows of at most ``MAX_NORM_K``)."""
    env = os.environ.get(ENV_OFF, "")
    if m != 1 or k < 1 or n < 1 or env not in ENV_VALUES:
        return None
    rows = 2 * n if silu_mul else n
    if rows * k > MAX_FUSED_ELEMENTS or (silu_mul and (n, k) in UNFUSED_SILU):
        return None
    key = ("silu" if silu_mul else "norm", n, k)
    if norm and key in NORM_ONE_PASS and env not in ("norm", "twopass"):
        return dataclasses.replace(NORM_ONE_PASS[key], one_pass=True)
    if norm and env == "onepass":
        return dataclasses.replace(_gemv_tile(n, k, silu_mul), one_pass=True)
    if norm and k > MAX_NORM_K:
        return None
    if norm and key not in NORM_FUSED:
        if env != "norm":
            return None
        if triton.next_power_of_2(k) <= 4096:
            return Config(1, block_k=triton.next_power_of_2(k), **NORM_TRIAL)
    return _gemv_tile(n, k, silu_mul)


def _gemv_tile(n: int, k: int, silu_mul: bool) -> Config:
    """The fused GEMV's tile without a measured prologue tile: the GEMV table's (or the default)."""
    rows = 2 * n if silu_mul else n
    c = TABLE.get((1, rows, k)) or TABLE.get((1, n, k))
    c = c if c is not None and c.block_m == 1 else default_config(1, n, k)
    # SiLU-and-mul: half the columns of the tile measured for the concatenated [2I, K] GEMV (or for one half, or
    # the default), so the program reads as many weight rows, and holds as many accumulators, as that tile
    return dataclasses.replace(c, block_n=max(1, c.block_n // 2)) if silu_mul else c


def launch_fused(x2: torch.Tensor, weight: torch.Tensor, config: Config, *, norm_weight: torch.Tensor | None = None,
                 eps: float = 0.0, residual: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, pdl: bool | None = None,
                 weight_stable: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch of ``_fused_gemv_kernel`` on ``x2 [M, K]`` (last dim contiguous) -> ``(out [M, N], h [M, K] or
    None)``. ``norm_weight``: the RMSNorm prologue (``residual``: with the add, ``h`` its sum), two-pass or, with
    ``config.one_pass``, one-pass (see ``_gemv_body``). ``up_weight`` ``[N, K]``: the SiLU-and-mul epilogue,
    ``weight`` being the gate. Weights contiguous. Public for the tests and the benchmark. ``pdl`` and
    ``weight_stable`` as in ``launch`` (``weight_stable`` covers ``weight`` and ``up_weight``); the prefetch before
    the wait applies where the program reads a weight block first (not with the two-pass prologue, which reads the
    row first, nor on a persistent grid: those wait first thing)."""
    m, k = x2.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    h = torch.empty((m, k), dtype=x2.dtype, device=x2.device) if residual is not None else None
    norm = norm_weight is not None
    one_pass = norm and config.one_pass
    row = triton.next_power_of_2(k) if norm and not one_pass else 1  # the two-pass prologue's first pass
    if m and n and k:
        c = config
        blocks = triton.cdiv(n, c.block_n)
        programs = min(blocks, c.programs * _sm_count(x2.device)) if c.programs else blocks
        r = residual if residual is not None else x2  # never read without HAS_RESIDUAL (nor the dummies below)
        pdl = pdl_enabled(x2.device) if pdl is None else pdl
        top = pdl and (programs < blocks or (norm and not one_pass))  # reads x before its first weight block
        _fused_gemv_kernel[(programs, m)](
            x2, r, norm_weight if norm else x2, weight, up_weight if up_weight is not None else weight, out,
            h if h is not None else out, n, k, x2.stride(0), r.stride(0), h.stride(0) if h is not None else 0,
            weight.stride(0), out.stride(0), eps, NORM=norm, NORM_ONE_PASS=one_pass, HAS_RESIDUAL=residual is not None,
            SILU_MUL=up_weight is not None, EVEN=(k % c.block_k == 0) and (n % c.block_n == 0), BLOCK_N=c.block_n,
            BLOCK_K=c.block_k, BLOCK_ROW=row, ROW_IN_REGS=norm and not one_pass and c.block_k == row,
            PERSISTENT=programs < blocks, PDL_TOP=top, PDL_WAIT=pdl and not top,
            PREFETCH=not top and _prefetch(pdl, weight_stable),
            num_warps=c.num_warps, num_stages=c.num_stages, **_pdl_launch(pdl))
    return out, h


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a persistent grid's unit); 4 off CUDA (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _rows(t: torch.Tensor, m: int, k: int) -> torch.Tensor:
    t2 = t.reshape(m, k)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _dense(*weights: torch.Tensor | None) -> bool:
    return all(w is None or (w.stride(1) == 1 and w.stride(0) == w.shape[1]) for w in weights)


def _split_silu_weights(weight: torch.Tensor, up_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up ``[I, K]`` as views (the concatenated weight's two row blocks: no copy)."""
    if up_weight is not None:
        return weight, up_weight
    width = weight.shape[0] // 2
    return weight[:width], weight[width:]


def _fusable(x, weight, up_weight, norm_weight, residual) -> bool:
    """Whether the fused kernel can take these operands: bf16/fp16 throughout, dense weights and a unit-stride norm
    weight (``fused_config`` checks the row length the two-pass prologue can hold)."""
    return (x.dtype in _DTYPES and all(t is None or t.dtype == x.dtype for t in (weight, up_weight, norm_weight, residual))
            and _dense(weight, up_weight) and (norm_weight is None or norm_weight.stride(0) == 1))


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _norm_config(x, norm_weight, weight, residual=None) -> Config | None:
    """The fused tile for this call, or None where it runs unfused."""
    if not _fusable(x, weight, None, norm_weight, residual):
        return None
    return fused_config(_tokens(x), weight.shape[0], x.shape[-1], silu_mul=False, norm=True)


def rms_norm_linear_cuda(x, norm_weight, eps, weight, weight_stable=False):
    """One kernel at one token (see ``fused_config``); otherwise ``fxp.rms_norm`` then ``fxp.linear``."""
    _check_rms_norm_linear(x, norm_weight, weight)
    c = _norm_config(x, norm_weight, weight)
    if c is None:
        return torch.ops.fxp.linear.default(torch.ops.fxp.rms_norm.default(x, norm_weight, eps), weight, None,
                                            weight_stable)
    k, n = x.shape[-1], weight.shape[0]
    out, _ = launch_fused(_rows(x, 1, k), weight, c, norm_weight=norm_weight, eps=eps, weight_stable=weight_stable)
    return out.view(*x.shape[:-1], n)


def add_rms_norm_linear_cuda(x, residual, norm_weight, eps, weight, weight_stable=False):
    """One kernel at one token (see ``fused_config``); otherwise ``fxp.add_rms_norm`` then ``fxp.linear``."""
    _check_add_rms_norm_linear(x, residual, norm_weight, weight)
    c = _norm_config(x, norm_weight, weight, residual)
    if c is None:
        normed, h = torch.ops.fxp.add_rms_norm.default(x, residual, norm_weight, eps)
        return torch.ops.fxp.linear.default(normed, weight, None, weight_stable), h
    k, n = x.shape[-1], weight.shape[0]
    out, h = launch_fused(_rows(x, 1, k), weight, c, norm_weight=norm_weight, eps=eps, residual=_rows(residual, 1, k),
                          weight_stable=weight_stable)
    return out.view(*x.shape[:-1], n), h.view(x.shape)


def _silu_config(x, weight, up_weight, norm_weight=None, residual=None) -> Config | None:
    if not _fusable(x, weight, up_weight, norm_weight, residual):
        return None
    width = weight.shape[0] if up_weight is not None else weight.shape[0] // 2
    return fused_config(_tokens(x), width, x.shape[-1], silu_mul=True, norm=norm_weight is not None)


def _unfused_silu(normed: torch.Tensor, weight: torch.Tensor, up_weight: torch.Tensor | None,
                  weight_stable: bool = False) -> torch.Tensor:
    """``fxp.linear`` then ``fxp.silu_and_mul`` on the product's halves (or on the two products): the kernels the
    unfused graph runs."""
    lin, silu = torch.ops.fxp.linear.default, torch.ops.fxp.silu_and_mul.default
    if up_weight is not None:
        return silu(lin(normed, weight, None, weight_stable), lin(normed, up_weight, None, weight_stable))
    y = lin(normed, weight, None, weight_stable)
    width = weight.shape[0] // 2
    return silu(y[..., :width], y[..., width:])


def linear_silu_mul_cuda(x, weight, up_weight=None, weight_stable=False):
    """One kernel at one token (see ``fused_config``); otherwise ``fxp.linear`` then ``fxp.silu_and_mul``."""
    width = check_silu_mul_weights("linear_silu_mul", x, weight, up_weight)
    c = _silu_config(x, weight, up_weight)
    if c is None:
        return _unfused_silu(x, weight, up_weight, weight_stable)
    gate, up = _split_silu_weights(weight, up_weight)
    k = x.shape[-1]
    out, _ = launch_fused(_rows(x, 1, k), gate, c, up_weight=up, weight_stable=weight_stable)
    return out.view(*x.shape[:-1], width)


def add_rms_norm_linear_silu_mul_cuda(x, residual, norm_weight, eps, weight, up_weight=None, weight_stable=False):
    """One kernel at one token where the norm prologue is on for the shape (see ``fused_config``); otherwise
    ``fxp.add_rms_norm`` then ``fxp.linear_silu_mul`` (itself one kernel at one token)."""
    width = _check_add_rms_norm_linear_silu_mul(x, residual, norm_weight, weight, up_weight)
    c = _silu_config(x, weight, up_weight, norm_weight, residual)
    if c is None:  # the norm kernel, then the projection with its SiLU-and-mul (fused where that op fuses it)
        normed, h = torch.ops.fxp.add_rms_norm.default(x, residual, norm_weight, eps)
        return torch.ops.fxp.linear_silu_mul.default(normed, weight, up_weight, weight_stable), h
    gate, up = _split_silu_weights(weight, up_weight)
    k = x.shape[-1]
    out, h = launch_fused(_rows(x, 1, k), gate, c, norm_weight=norm_weight, eps=eps, residual=_rows(residual, 1, k),
                          up_weight=up, weight_stable=weight_stable)
    return out.view(*x.shape[:-1], width), h.view(x.shape)


def register() -> None:
    LIB.impl("linear", linear_cuda, "CUDA")
    LIB.impl("rms_norm_linear", rms_norm_linear_cuda, "CUDA")
    LIB.impl("add_rms_norm_linear", add_rms_norm_linear_cuda, "CUDA")
    LIB.impl("linear_silu_mul", linear_silu_mul_cuda, "CUDA")
    LIB.impl("add_rms_norm_linear_silu_mul", add_rms_norm_linear_silu_mul_cuda, "CUDA")
