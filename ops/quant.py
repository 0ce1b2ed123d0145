"""Static per-tensor fp8 (float8_e4m3fn) quantization and its fusions with the norms.

``quant_fp8(x, scale) = clamp(x / scale, -448, 448).to(float8_e4m3fn)``, computed in float32. ``scale`` is a
float32 tensor with one element (static scales live in the checkpoint, so they are graph inputs, not constants).
"""
from __future__ import annotations

import torch

from fxpasses.ops.library import check_float, check_norm_shapes, check_same_device, define_op
from fxpasses.ops.norms import all_reduce_sum, rms_norm_reference

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def check_scale(op: str, scale: torch.Tensor, x: torch.Tensor) -> None:
    # a 0-d CPU scale would work with a CUDA x in plain torch, but not in a kernel that loads it: one device for all
    check_same_device(op, x=x, scale=scale)
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(
            f"fxp.{op}: scale must be a float32 tensor with one element (static per-tensor scale), "
            f"got shape {tuple(scale.shape)} dtype {scale.dtype}."
        )


def quant_fp8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _quant_fp8(x, scale):
    check_float("quant_fp8", x=x)
    check_scale("quant_fp8", scale, x)
    return quant_fp8_reference(x, scale)


def _quant_fp8_fake(x, scale):
    check_float("quant_fp8", x=x)
    check_scale("quant_fp8", scale, x)
    return torch.empty_like(x, dtype=FP8_DTYPE)


quant_fp8 = define_op("quant_fp8(Tensor x, Tensor scale) -> Tensor", _quant_fp8, _quant_fp8_fake)


def _rms_norm_quant_fp8(x, weight, eps, scale):
    check_float("rms_norm_quant_fp8", x=x, weight=weight)
    check_norm_shapes("rms_norm_quant_fp8", x, weight)
    check_scale("rms_norm_quant_fp8", scale, x)
    return quant_fp8_reference(rms_norm_reference(x, weight, eps), scale)


def _rms_norm_quant_fp8_fake(x, weight, eps, scale):
    check_float("rms_norm_quant_fp8", x=x, weight=weight)
    check_norm_shapes("rms_norm_quant_fp8", x, weight)
    check_scale("rms_norm_quant_fp8", scale, x)
    return torch.empty_like(x, dtype=FP8_DTYPE)


rms_norm_quant_fp8 = define_op(
    "rms_norm_quant_fp8(Tensor x, Tensor weight, float eps, Tensor scale) -> Tensor",
    _rms_norm_quant_fp8,
    _rms_norm_quant_fp8_fake,
)


def _add_rms_norm_quant_fp8(x, residual, weight, eps, scale):
    check_float("add_rms_norm_quant_fp8", x=x, residual=residual, weight=weight)
    check_norm_shapes("add_rms_norm_quant_fp8", x, weight, residual)
    check_scale("add_rms_norm_quant_fp8", scale, x)
    residual_out = x + residual
    return quant_fp8_reference(rms_norm_reference(residual_out, weight, eps), scale), residual_out


def _add_rms_norm_quant_fp8_fake(x, residual, weight, eps, scale):
    check_float("add_rms_norm_quant_fp8", x=x, residual=residual, weight=weight)
    check_norm_shapes("add_rms_norm_quant_fp8", x, weight, residual)
    check_scale("add_rms_norm_quant_fp8", scale, x)
    return torch.empty_like(x, dtype=FP8_DTYPE), torch.empty_like(x)


add_rms_norm_quant_fp8 = define_op(
    "add_rms_norm_quant_fp8(Tensor x, Tensor residual, Tensor weight, float eps, Tensor scale)"
    " -> (Tensor out, Tensor residual_out)",
    _add_rms_norm_quant_fp8,
    _add_rms_norm_quant_fp8_fake,
)


def _check_allreduce_add_rms_norm_quant_fp8(x, residual, weight, scale):
    check_float("allreduce_add_rms_norm_quant_fp8", x=x, residual=residual, weight=weight)
    check_norm_shapes("allreduce_add_rms_norm_quant_fp8", x, weight, residual)
    check_scale("allreduce_add_rms_norm_quant_fp8", scale, x)


def _allreduce_add_rms_norm_quant_fp8(x, residual, weight, eps, scale, group_name):
    _check_allreduce_add_rms_norm_quant_fp8(x, residual, weight, scale)  # before the collective, as in norms.py
    return torch.ops.fxp.add_rms_norm_quant_fp8.default(all_reduce_sum(x, group_name), residual, weight, eps, scale)


def _allreduce_add_rms_norm_quant_fp8_fake(x, residual, weight, eps, scale, group_name):
    _check_allreduce_add_rms_norm_quant_fp8(x, residual, weight, scale)
    return _add_rms_norm_quant_fp8_fake(x, residual, weight, eps, scale)


allreduce_add_rms_norm_quant_fp8 = define_op(
    "allreduce_add_rms_norm_quant_fp8(Tensor x, Tensor residual, Tensor weight, float eps, Tensor scale,"
    " str group_name) -> (Tensor out, Tensor residual_out)",
    _allreduce_add_rms_norm_quant_fp8,
    _allreduce_add_rms_norm_quant_fp8_fake,
)
