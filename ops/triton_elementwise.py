"""Triton kernels for ``fxp.rotary_embedding`` and ``fxp.silu_and_mul`` on CUDA tensors.

Rotary: one program per token, all its heads at once (``x [tokens, heads, dim]``, ``cos``/``sin`` one row per token,
shared by the heads); the two halves are loaded once and both output halves written. Other layouts (e.g.
transformers' ``[batch, heads, seq, dim]`` with cos ``[batch, 1, seq, dim]``) and mixed dtypes without ``upcast``
use the reference composition, which is correct but not fused. silu_and_mul: rows times column blocks, any row
stride, so ``gate`` and ``up`` can be the two halves of one projection's output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpasses.ops.elementwise import _check_rotary, _check_silu_and_mul, rotary_embedding_reference, silu_and_mul_reference
from fxpasses.ops.library import LIB
from fxpasses.ops.triton_rounding import round_as


@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, sxt, sxh, sct, sst, sot, soh, HEADS, HALF, UPCAST: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < HEADS) & (d < HALF)
    x1 = tl.load(X + t * sxt + h * sxh + d, mask=mask, other=0.0)
    x2 = tl.load(X + t * sxt + h * sxh + HALF + d, mask=mask, other=0.0)
    c1 = tl.load(COS + t * sct + d, mask=d < HALF, other=0.0)
    c2 = tl.load(COS + t * sct + HALF + d, mask=d < HALF, other=0.0)
    s1 = tl.load(SIN + t * sst + d, mask=d < HALF, other=0.0)
    s2 = tl.load(SIN + t * sst + HALF + d, mask=d < HALF, other=0.0)
    if UPCAST:  # float32 throughout, one rounding at the end
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        o1 = x1f * c1.to(tl.float32) - x2f * s1.to(tl.float32)
        o2 = x2f * c2.to(tl.float32) + x1f * s2.to(tl.float32)
    else:  # eager in the input dtype: each product rounded to it, then the sum (rounded by the store)
        dt = X.dtype.element_ty
        o1 = (round_as(x1.to(tl.float32) * c1.to(tl.float32), dt)
              + round_as(-x2.to(tl.float32) * s1.to(tl.float32), dt))
        o2 = (round_as(x2.to(tl.float32) * c2.to(tl.float32), dt)
              + round_as(x1.to(tl.float32) * s2.to(tl.float32), dt))
    tl.store(OUT + t * sot + h * soh + d, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + t * sot + h * soh + HALF + d, o2.to(OUT.dtype.element_ty), mask=mask)


def _token_rows(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """cos/sin as [tokens, dim] rows (last dim contiguous) when they are one row per token shared by the heads."""
    if c.dim() == 3 and c.shape[1] == 1:
        c = c[:, 0]
    if c.dim() == 2 and c.shape == (x.shape[0], x.shape[2]) and c.stride(-1) == 1:
        return c
    return None


def rotary_embedding_cuda(x, cos, sin, upcast):
    _check_rotary(x, cos, sin)
    c, s = (_token_rows(cos, x), _token_rows(sin, x)) if x.dim() == 3 else (None, None)
    same_dtype = upcast or (cos.dtype == x.dtype and sin.dtype == x.dtype)
    if c is None or s is None or x.stride(-1) != 1 or not same_dtype:
        return rotary_embedding_reference(x, cos, sin, upcast)
    tokens, heads, dim = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if tokens:
        half = dim // 2
        _rotary_kernel[(tokens,)](x, c, s, out, x.stride(0), x.stride(1), c.stride(0), s.stride(0), out.stride(0),
                                  out.stride(1), heads, half, UPCAST=upcast, BLOCK_H=triton.next_power_of_2(heads),
                                  BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    return out


@triton.jit
def _silu_and_mul_kernel(G, U, OUT, sg, su, so, COLS, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < COLS
    g = tl.load(G + row * sg + cols, mask=mask, other=0.0)
    u = tl.load(U + row * su + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = round_as(gf / (1.0 + tl.exp(-gf)), g.dtype)  # silu, rounded to the input dtype as eager's F.silu
    tl.store(OUT + row * so + cols, (act * u.to(tl.float32)).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul_cuda(gate, up):
    _check_silu_and_mul(gate, up)
    if gate.dtype != up.dtype or gate.dim() == 0 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return silu_and_mul_reference(gate, up)
    cols = gate.shape[-1]
    g2, u2 = gate.reshape(-1, cols), up.reshape(-1, cols)  # views for the usual [tokens, cols] slices
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows = g2.shape[0]
    if rows and cols:
        block = min(triton.next_power_of_2(cols), 1024)
        _silu_and_mul_kernel[(rows, triton.cdiv(cols, block))](g2, u2, out.view(-1, cols), g2.stride(0), u2.stride(0),
                                                               cols, cols, BLOCK=block, num_warps=4)
    return out


def register() -> None:
    LIB.impl("rotary_embedding", rotary_embedding_cuda, "CUDA")
    LIB.impl("silu_and_mul", silu_and_mul_cuda, "CUDA")
