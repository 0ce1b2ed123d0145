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

The fused decode ops fold the kernels around a projection into its 1-token GEMV, because at one token each kernel
costs about 2.2 µs of fixed time on top of its bytes (docs/performance.md): ``rms_norm_linear`` and
``add_rms_norm_linear`` (the norm, and the residual add, as the GEMV's prologue), ``linear_silu_mul`` (SwiGLU's
activation as the gate/up projection's epilogue) and ``add_rms_norm_linear_silu_mul`` (both). Each one's CPU
reference is the composition it replaces, op for op, so bit-identical to it; on CUDA the fused kernel rounds where
the unfused kernels round, and runs at one token only (elsewhere the op runs the unfused kernels).

Every projection op here takes a trailing ``weight_stable=False``. On CUDA the Triton kernels are launched with
programmatic dependent launch (``ops/triton_linear.pdl_enabled``: the next kernel starts while the previous one
drains, and waits with ``gdc_wait`` before reading anything a kernel may have written). ``weight_stable=True`` says
that no kernel of the step writes ``weight`` (and ``up_weight``), so the 1-token GEMV may load its first weight
block *before* that wait, overlapping the previous kernel's tail. It is a promise about the graph, not the data:
``fxpasses.stable_weights`` sets it only where it proved it (the weight is a graph input or attribute that no node
writes); nothing else should. It never changes a result, and CPU (the reference) ignores it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpasses.ops.library import check_float, check_norm_shapes, check_same_device, define_op
from fxpasses.ops.norms import rms_norm_reference


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: str = "linear",
                 weight_name: str = "weight") -> None:
    """Raise a ValueError naming the argument for shapes or dtypes ``F.linear`` would reject (or silently
    promote). ``op`` and ``weight_name``: how the calling op names itself and this weight in its errors."""
    optional = {"bias": bias} if bias is not None else {}
    check_float(op, x=x, **{weight_name: weight}, **optional)
    check_same_device(op, x=x, **{weight_name: weight}, **optional)
    if weight.dim() != 2:
        raise ValueError(f"fxp.{op}: {weight_name} must be 2-D [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}.")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fxp.{op}: x {tuple(x.shape)} must end in in_features = {weight_name}.shape[1] = "
                         f"{weight.shape[1]}.")
    if weight.dtype != x.dtype:
        raise ValueError(f"fxp.{op}: {weight_name} is {weight.dtype} but x is {x.dtype}; cast one so they match.")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"fxp.{op}: bias is {tuple(bias.shape)} {bias.dtype}; it must be 1-D of out_features "
                         f"({weight.shape[0]}) in x's dtype {x.dtype}.")


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     weight_stable: bool = False) -> torch.Tensor:
    check_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear_fake(x, weight, bias=None, weight_stable=False):
    check_linear(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear = define_op("linear(Tensor x, Tensor weight, Tensor? bias=None, bool weight_stable=False) -> Tensor",
                   linear_reference, _linear_fake)


# ---- add + RMSNorm folded into the following projection ------------------------------------------------------
def _check_add_rms_norm_linear(x, residual, norm_weight, weight):
    check_float("add_rms_norm_linear", x=x, residual=residual, norm_weight=norm_weight)
    # by this op's own argument names, before the shape checks (which call the norm's weight "weight")
    check_same_device("add_rms_norm_linear", x=x, residual=residual, norm_weight=norm_weight, weight=weight)
    check_norm_shapes("add_rms_norm_linear", x, norm_weight, residual)
    check_linear(x, weight, None, "add_rms_norm_linear")


def add_rms_norm_linear_reference(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                  weight: torch.Tensor, weight_stable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; ``(F.linear(rms_norm(h), weight), h)``: eager's ops, in eager's order."""
    _check_add_rms_norm_linear(x, residual, norm_weight, weight)
    h = x + residual
    return F.linear(rms_norm_reference(h, norm_weight, eps), weight), h


def _add_rms_norm_linear_fake(x, residual, norm_weight, eps, weight, weight_stable=False):
    _check_add_rms_norm_linear(x, residual, norm_weight, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), torch.empty_like(x)


# The residual add and RMSNorm of a pre-norm decoder layer feeding its next projection (qkv or gate_up). The CUDA
# kernel (ops/triton_linear.py) has each 1-token GEMV program recompute the row's norm from x and residual (a few KB
# from L2), the first one writing h, so the norm kernel disappears; it runs only for the projections its measured
# list names (none yet), elsewhere fxp.add_rms_norm then fxp.linear, as unfused.
add_rms_norm_linear = define_op(
    "add_rms_norm_linear(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight,"
    " bool weight_stable=False) -> (Tensor out, Tensor residual_out)",
    add_rms_norm_linear_reference,
    _add_rms_norm_linear_fake,
)


# ---- RMSNorm (no residual) folded into the following projection ----------------------------------------------
def _check_rms_norm_linear(x, norm_weight, weight):
    check_float("rms_norm_linear", x=x, norm_weight=norm_weight)
    check_same_device("rms_norm_linear", x=x, norm_weight=norm_weight, weight=weight)
    check_norm_shapes("rms_norm_linear", x, norm_weight)
    check_linear(x, weight, None, "rms_norm_linear")


def rms_norm_linear_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              weight: torch.Tensor, weight_stable: bool = False) -> torch.Tensor:
    """``F.linear(rms_norm(x), weight)``: eager's ops, in eager's order."""
    _check_rms_norm_linear(x, norm_weight, weight)
    return F.linear(rms_norm_reference(x, norm_weight, eps), weight)


def _rms_norm_linear_fake(x, norm_weight, eps, weight, weight_stable=False):
    _check_rms_norm_linear(x, norm_weight, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# The first layer's input norm (the embedding is the residual, so there is no add) feeding the qkv projection.
rms_norm_linear = define_op("rms_norm_linear(Tensor x, Tensor norm_weight, float eps, Tensor weight,"
                            " bool weight_stable=False) -> Tensor", rms_norm_linear_reference, _rms_norm_linear_fake)


# ---- SiLU-and-mul in the gate/up projection's epilogue ---------------------------------------------------------
def check_silu_mul_weights(op: str, x: torch.Tensor, weight: torch.Tensor, up_weight: torch.Tensor | None) -> int:
    """Check a SwiGLU projection's weights for ``x``; return the activation's width I.

    ``up_weight`` None: ``weight`` is gate and up concatenated, ``[2I, K]`` (gate rows first), as a fused
    ``gate_up`` projection stores them. Otherwise ``weight`` is the gate ``[I, K]`` and ``up_weight`` the up
    projection ``[I, K]`` (transformers' separate ``gate_proj`` / ``up_proj``: nothing is copied)."""
    check_linear(x, weight, None, op)
    if up_weight is None:
        if weight.shape[0] % 2:
            raise ValueError(f"fxp.{op}: weight has {weight.shape[0]} rows; with no up_weight it must be gate and up "
                             "concatenated ([2I, K], an even number of rows). Pass the up projection as up_weight "
                             "if they are separate.")
        return weight.shape[0] // 2
    check_linear(x, up_weight, None, op, "up_weight")
    if up_weight.shape != weight.shape:
        raise ValueError(f"fxp.{op}: up_weight is {tuple(up_weight.shape)} but the gate weight is "
                         f"{tuple(weight.shape)}; they must have one shape [I, K].")
    return weight.shape[0]


def silu_mul_of(y: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` as ``fxp.silu_and_mul``'s reference computes it (silu rounded to the dtype, then the
    product): ``gate, up`` the two halves of ``y`` when ``up`` is None, else ``y`` and ``up``."""
    if up is None:
        gate, up = y.split([y.shape[-1] // 2, y.shape[-1] // 2], dim=-1)
    else:
        gate = y
    return F.silu(gate) * up


def linear_silu_mul_reference(x: torch.Tensor, weight: torch.Tensor, up_weight: torch.Tensor | None = None,
                              weight_stable: bool = False) -> torch.Tensor:
    """``gate, up = F.linear(x, weight).split(2)`` (or ``F.linear(x, weight)``, ``F.linear(x, up_weight)``);
    ``silu(gate) * up``: the composition it replaces, op for op."""
    check_silu_mul_weights("linear_silu_mul", x, weight, up_weight)
    if up_weight is None:
        return silu_mul_of(F.linear(x, weight))
    return silu_mul_of(F.linear(x, weight), F.linear(x, up_weight))


def _linear_silu_mul_fake(x, weight, up_weight=None, weight_stable=False):
    width = check_silu_mul_weights("linear_silu_mul", x, weight, up_weight)
    return x.new_empty((*x.shape[:-1], width))


# SwiGLU's gate/up projection and its activation as one op: out[..., i] = silu(x . gate_i) * (x . up_i). The CUDA
# kernel (ops/triton_linear.py) has each 1-token GEMV program compute matching gate and up columns, so the
# [tokens, 2I] product is never written and the silu_and_mul kernel disappears.
linear_silu_mul = define_op("linear_silu_mul(Tensor x, Tensor weight, Tensor? up_weight=None,"
                            " bool weight_stable=False) -> Tensor",
                            linear_silu_mul_reference, _linear_silu_mul_fake)


def _check_add_rms_norm_linear_silu_mul(x, residual, norm_weight, weight, up_weight):
    op = "add_rms_norm_linear_silu_mul"
    check_float(op, x=x, residual=residual, norm_weight=norm_weight)
    check_same_device(op, x=x, residual=residual, norm_weight=norm_weight, weight=weight, up_weight=up_weight)
    check_norm_shapes(op, x, norm_weight, residual)
    return check_silu_mul_weights(op, x, weight, up_weight)


def add_rms_norm_linear_silu_mul_reference(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                                           eps: float, weight: torch.Tensor, up_weight: torch.Tensor | None = None,
                                           weight_stable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; ``(linear_silu_mul(rms_norm(h), weight, up_weight), h)``: eager's ops, in order."""
    _check_add_rms_norm_linear_silu_mul(x, residual, norm_weight, weight, up_weight)
    h = x + residual
    normed = rms_norm_reference(h, norm_weight, eps)
    if up_weight is None:
        return silu_mul_of(F.linear(normed, weight)), h
    return silu_mul_of(F.linear(normed, weight), F.linear(normed, up_weight)), h


def _add_rms_norm_linear_silu_mul_fake(x, residual, norm_weight, eps, weight, up_weight=None, weight_stable=False):
    width = _check_add_rms_norm_linear_silu_mul(x, residual, norm_weight, weight, up_weight)
    return x.new_empty((*x.shape[:-1], width)), torch.empty_like(x)


# A Llama layer's second half up to the down projection: residual add, post-attention RMSNorm, gate/up projection
# and SiLU-and-mul, in one kernel at one token (two kernels fewer than add_rms_norm + linear + silu_and_mul).
add_rms_norm_linear_silu_mul = define_op(
    "add_rms_norm_linear_silu_mul(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight,"
    " Tensor? up_weight=None, bool weight_stable=False) -> (Tensor out, Tensor residual_out)",
    add_rms_norm_linear_silu_mul_reference,
    _add_rms_norm_linear_silu_mul_fake,
)
