"""``fxp.linear``: ``y = x @ weight.T (+ bias)``, one op whose CUDA kernel is chosen per token count.

At a few tokens a projection is a matrix-vector product: it reads the whole weight to do two FLOPs per weight
element, so the only cost is bandwidth. cuBLAS picks tile shapes made for large products; in a 1-token Llama-1B
decode step it leaves up to 58% of the copy bandwidth unused on the smaller projections (docs/performance.md).
On CUDA this op runs a Triton GEMV / small-M kernel (``ops/triton_linear.py``) for the token counts and weight
shapes where it was measured faster, and ``torch.nn.functional.linear`` (cuBLAS) everywhere else; under a CUDA
graph the choice is made once per captured size. On CPU (and as the reference) it *is*
``torch.nn.functional.linear``, so CPU results are bit-identical to eager. On CUDA the Triton kernel sums in a
different order than cuBLAS (both accumulate in float32 and round once), so results agree within bf16 GEMM
tolerance, not bit for bit.

``weight`` is ``[out_features, in_features]`` as ``nn.Linear`` stores it; ``x`` is ``[..., in_features]``;
``bias`` is ``[out_features]`` or None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpasses.ops.library import check_float, check_norm_shapes, check_same_device, define_op
from fxpasses.ops.norms import rms_norm_reference


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise a ValueError naming the argument for shapes or dtypes ``F.linear`` would reject (or silently
    promote)."""
    optional = {"bias": bias} if bias is not None else {}
    check_float("linear", x=x, weight=weight, **optional)
    check_same_device("linear", x=x, weight=weight, **optional)
    if weight.dim() != 2:
        raise ValueError(f"fxp.linear: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}.")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fxp.linear: x {tuple(x.shape)} must end in in_features = weight.shape[1] = "
                         f"{weight.shape[1]}.")
    if weight.dtype != x.dtype:
        raise ValueError(f"fxp.linear: weight is {weight.dtype} but x is {x.dtype}; cast one so they match.")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"fxp.linear: bias is {tuple(bias.shape)} {bias.dtype}; it must be 1-D of out_features "
                         f"({weight.shape[0]}) in x's dtype {x.dtype}.")


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear_fake(x, weight, bias=None):
    check_linear(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear = define_op("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor", linear_reference, _linear_fake)


# ---- add + RMSNorm folded into the following projection ------------------------------------------------------
def _check_add_rms_norm_linear(x, residual, norm_weight, weight):
    check_float("add_rms_norm_linear", x=x, residual=residual, norm_weight=norm_weight)
    # by this op's own argument names, before the shape checks (which call the norm's weight "weight")
    check_same_device("add_rms_norm_linear", x=x, residual=residual, norm_weight=norm_weight, weight=weight)
    check_norm_shapes("add_rms_norm_linear", x, norm_weight, residual)
    check_linear(x, weight, None)


def add_rms_norm_linear_reference(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; ``(F.linear(rms_norm(h), weight), h)``: eager's ops, in eager's order."""
    _check_add_rms_norm_linear(x, residual, norm_weight, weight)
    h = x + residual
    return F.linear(rms_norm_reference(h, norm_weight, eps), weight), h


def _add_rms_norm_linear_fake(x, residual, norm_weight, eps, weight):
    _check_add_rms_norm_linear(x, residual, norm_weight, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), torch.empty_like(x)


# The residual add and RMSNorm of a pre-norm decoder layer feeding its next projection (qkv or gate_up). The CUDA
# kernel (ops/triton_linear.py) has each 1-token GEMV program recompute the row's norm from x and residual (a few KB
# from L2), the first one writing h, so the norm kernel disappears; it runs only for the projections its measured
# list names (none yet), elsewhere fxp.add_rms_norm then fxp.linear, as unfused.
add_rms_norm_linear = define_op(
    "add_rms_norm_linear(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight)"
    " -> (Tensor out, Tensor residual_out)",
    add_rms_norm_linear_reference,
    _add_rms_norm_linear_fake,
)
