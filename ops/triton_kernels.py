"""Triton kernels for the norm ops on CUDA tensors: one program per row, one pass over memory.

Each program loads its row (and residual row) once, computes the float32 sum of squares, and writes the outputs:
``residual_out = x + residual`` (rounded to the input dtype, as eager does), ``out = weight * (r * rstd).to(dtype)``,
optionally quantized to fp8 (``clamp(out / scale, ±448)``). Registered for the CUDA dispatch key only; CPU keeps
the reference implementations. Imported only when Triton is available.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpasses.ops.library import LIB, check_float, check_norm_shapes
from fxpasses.ops.quant import FP8_DTYPE, FP8_MAX, check_scale
from fxpasses.ops.triton_rounding import round_as


@triton.jit
def _norm_kernel(X, R, W, OUT, ROUT, SCALE, stride_x, stride_r, stride_o, stride_ro, n_cols, eps, fp8_max,
                 HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        xf = round_as(x.to(tl.float32) + r.to(tl.float32), X.dtype.element_ty)  # rounded to the input dtype, as eager's add
        tl.store(ROUT + row * stride_ro + cols, xf.to(ROUT.dtype.element_ty), mask=mask)
    else:
        xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    # eager: weight * normalized.to(dtype), each rounded to the input dtype (ops.triton_rounding says why not .to)
    y = round_as(w.to(tl.float32) * round_as(xf * rstd, X.dtype.element_ty), X.dtype.element_ty)
    if QUANT:
        scale = tl.load(SCALE)
        q = tl.clamp(y / scale, -fp8_max, fp8_max)
        tl.store(OUT + row * stride_o + cols, q.to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=mask)


def default_warps(hidden: int, rows: int) -> int:
    """Warps per row-program: a block of 256 elements per warp, at most 16."""
    return min(max(triton.next_power_of_2(hidden) // 256, 1), 16)


def _launch(x, residual, weight, eps, scale=None, num_warps=None):
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=FP8_DTYPE if scale is not None else x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    r2 = residual.reshape(-1, hidden).contiguous() if residual is not None else x2
    rout = torch.empty_like(x) if residual is not None else out
    rout2 = rout.view(-1, hidden)
    block = triton.next_power_of_2(hidden)
    warps = num_warps or default_warps(hidden, rows)
    if rows:
        _norm_kernel[(rows,)](
            x2, r2, weight, out2, rout2, scale if scale is not None else weight,
            x2.stride(0), r2.stride(0), out2.stride(0), rout2.stride(0), hidden, eps, FP8_MAX,
            HAS_RESIDUAL=residual is not None, QUANT=scale is not None, BLOCK=block, num_warps=warps,
        )
    return (out, rout) if residual is not None else out


def rms_norm_cuda(x, weight, eps):
    check_float("rms_norm", x=x, weight=weight)
    check_norm_shapes("rms_norm", x, weight)
    return _launch(x, None, weight, eps)


def add_rms_norm_cuda(x, residual, weight, eps):
    check_float("add_rms_norm", x=x, residual=residual, weight=weight)
    check_norm_shapes("add_rms_norm", x, weight, residual)
    return _launch(x, residual, weight, eps)


def rms_norm_quant_fp8_cuda(x, weight, eps, scale):
    check_float("rms_norm_quant_fp8", x=x, weight=weight)
    check_norm_shapes("rms_norm_quant_fp8", x, weight)
    check_scale("rms_norm_quant_fp8", scale, x)
    return _launch(x, None, weight, eps, scale)


def add_rms_norm_quant_fp8_cuda(x, residual, weight, eps, scale):
    check_float("add_rms_norm_quant_fp8", x=x, residual=residual, weight=weight)
    check_norm_shapes("add_rms_norm_quant_fp8", x, weight, residual)
    check_scale("add_rms_norm_quant_fp8", scale, x)
    return _launch(x, residual, weight, eps, scale)


def register() -> None:
    LIB.impl("rms_norm", rms_norm_cuda, "CUDA")
    LIB.impl("add_rms_norm", add_rms_norm_cuda, "CUDA")
    LIB.impl("rms_norm_quant_fp8", rms_norm_quant_fp8_cuda, "CUDA")
    LIB.impl("add_rms_norm_quant_fp8", add_rms_norm_quant_fp8_cuda, "CUDA")
