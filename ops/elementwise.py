"""``fxp.rotary_embedding`` and ``fxp.silu_and_mul``: the elementwise chains of a decoder layer, each as one op.

Without Inductor every ATen op of a graph is its own kernel: rotate-half RoPE is about eight per tensor (cast,
split, neg, cat, two muls, add, cast back), SwiGLU's activation two. In a captured CUDA graph at a few tokens these
tiny kernels, not the matmuls, set the step time, so serving engines ship them as single kernels (vLLM's
``rotary_embedding`` and ``silu_and_mul``). The patterns in ``patterns/elementwise.py`` put these ops in; on the
Inductor path they stay out, since Inductor fuses such chains itself and an opaque op would stop it.

Both ops give exactly what their composition gives in eager:

- ``rotary_embedding(x, cos, sin, upcast)`` is ``x * cos + rotate_half(x) * sin`` with
  ``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])``; ``cos`` and ``sin`` broadcast to ``x``. With ``upcast`` the
  sum is computed in float32 and rounded once to ``x.dtype`` (the ``x.float() ... .to(dtype)`` spelling); without,
  in the promoted dtype, rounding each product and the sum as eager does (transformers' spelling).
- ``silu_and_mul(gate, up)`` is ``silu(gate) * up``: silu rounded to ``gate.dtype``, then the product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpasses.ops.library import check_float, check_same_device, define_op


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_rotary(x, cos, sin):
    check_float("rotary_embedding", x=x, cos=cos, sin=sin)
    check_same_device("rotary_embedding", x=x, cos=cos, sin=sin)
    if x.dim() == 0:
        raise ValueError("fxp.rotary_embedding: x is 0-d (a scalar); it needs a last dimension of even size to rotate.")
    if x.shape[-1] % 2:
        raise ValueError(f"fxp.rotary_embedding: the last dimension of x ({x.shape[-1]}) must be even.")
    shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
    if tuple(shape) != tuple(x.shape):
        raise ValueError(f"fxp.rotary_embedding: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must broadcast "
                         f"to x {tuple(x.shape)} without enlarging it.")


def rotary_embedding_reference(x, cos, sin, upcast):
    _check_rotary(x, cos, sin)
    if upcast:
        xf = x.float()
        return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def _rotary_fake(x, cos, sin, upcast):
    _check_rotary(x, cos, sin)
    dtype = x.dtype if upcast else torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return x.new_empty(x.shape, dtype=dtype)


def _check_silu_and_mul(gate, up):
    check_float("silu_and_mul", gate=gate, up=up)
    check_same_device("silu_and_mul", gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"fxp.silu_and_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape.")


def silu_and_mul_reference(gate, up):
    _check_silu_and_mul(gate, up)
    return F.silu(gate) * up


def _silu_and_mul_fake(gate, up):
    _check_silu_and_mul(gate, up)
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


rotary_embedding = define_op("rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool upcast) -> Tensor",
                             rotary_embedding_reference, _rotary_fake)
silu_and_mul = define_op("silu_and_mul(Tensor gate, Tensor up) -> Tensor", silu_and_mul_reference,
                         _silu_and_mul_fake)
