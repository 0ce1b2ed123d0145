"""Static per-tensor fp8 quantization, alone and fused with each norm pattern.

``quant_fp8`` spelled in torch: ``(x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)``; the fused
variants are each norm family's spellings followed by it. Benefits sit above the unquantized family, and the driver
works bottom-up, so a norm followed by a quantization fuses into one op before the norm alone is considered.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxpasses import ops
from fxpasses.patterns.matcher import Match
from fxpasses.patterns.norms import (
    _all_reduce,
    _norm_inputs,
    check_norm,
    check_residual,
    check_tp_group,
    rms_norm_spellings,
    tp_enabled,
)
from fxpasses.patterns.registry import MatchContext, holds_float8, pattern

fxp = torch.ops.fxp
aten = torch.ops.aten


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-ops.FP8_MAX, ops.FP8_MAX).to(ops.FP8_DTYPE)


def check_scale(m: Match, ctx: MatchContext) -> str | None:
    s = m.bindings["scale"].meta.get("val")
    if s is None or s.numel() != 1 or s.dtype != torch.float32:
        return "the scale is not a one-element float32 tensor (static per-tensor quantization)"
    return None


def check_quant_input(m: Match, ctx: MatchContext) -> str | None:
    x = m.bindings["x"].meta.get("val")
    if x is None or x.dtype not in ops.SUPPORTED_FLOAT_DTYPES:
        return f"dtype {getattr(x, 'dtype', None)} is not registered for fxp.quant_fp8"
    return None


def is_fp8_cast(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is aten._to_copy.default
            and node.kwargs.get("dtype") == ops.FP8_DTYPE)


@pattern(
    name="quant_fp8",
    needs=holds_float8,
    benefit=5,
    spellings=lambda: [quantize],
    input_names=("x", "scale"),
    example_inputs=lambda dtype: (torch.empty(3, 8, dtype=dtype, device="meta"),
                                  torch.empty((), dtype=torch.float32, device="meta")),
    checks=(check_quant_input, check_scale),
    hint=is_fp8_cast,
)
def quant_fp8(b, x, scale, **_):
    """static per-tensor fp8 quantization -> fxp.quant_fp8"""
    return b.call(fxp.quant_fp8.default, x, scale)


def _quantized(spelling: Callable[..., Any]) -> Callable[..., Any]:
    def search(x, weight, eps, scale):
        return quantize(spelling(x, weight, eps), scale)

    return search


def _add_quantized(spelling: Callable[..., Any]) -> Callable[..., Any]:
    def search(x, residual, weight, eps, scale):
        r = x + residual
        return quantize(spelling(r, weight, eps), scale), r

    return search


def _allreduce_add_quantized(spelling: Callable[..., Any]) -> Callable[..., Any]:
    def search(x, residual, weight, eps, scale, group):
        r = _all_reduce(x, group) + residual
        return quantize(spelling(r, weight, eps), scale), r

    return search


@pattern(
    name="rms_norm_quant_fp8",
    needs=holds_float8,
    benefit=15,
    spellings=lambda: [_quantized(s) for s in rms_norm_spellings()],
    input_names=("x", "weight", "eps", "scale"),
    example_inputs=lambda dtype: _norm_inputs(dtype, "scale"),
    checks=(check_norm, check_scale),
    hint=is_fp8_cast,
)
def rms_norm_quant_fp8(b, x, weight, eps, scale, **_):
    """RMSNorm then fp8 quantization -> fxp.rms_norm_quant_fp8"""
    return b.call(fxp.rms_norm_quant_fp8.default, x, weight, eps, scale)


@pattern(
    name="add_rms_norm_quant_fp8",
    needs=holds_float8,
    benefit=25,
    spellings=lambda: [_add_quantized(s) for s in rms_norm_spellings()],
    input_names=("x", "residual", "weight", "eps", "scale"),
    example_inputs=lambda dtype: _norm_inputs(dtype, "residual", "scale"),
    checks=(check_norm, check_residual, check_scale),
    hint=is_fp8_cast,
)
def add_rms_norm_quant_fp8(b, x, residual, weight, eps, scale, **_):
    """residual add, RMSNorm, fp8 quantization -> fxp.add_rms_norm_quant_fp8"""
    return b.outputs(b.call(fxp.add_rms_norm_quant_fp8.default, x, residual, weight, eps, scale), 2)


@pattern(
    name="allreduce_add_rms_norm_quant_fp8",
    needs=holds_float8,
    benefit=35,
    spellings=lambda: [_allreduce_add_quantized(s) for s in rms_norm_spellings()],
    input_names=("x", "residual", "weight", "eps", "scale", "group"),
    example_inputs=lambda dtype: _norm_inputs(dtype, "residual", "scale", "group"),
    checks=(check_norm, check_residual, check_scale, check_tp_group),
    applies=tp_enabled,
    applies_doc="mapping.tp_size > 1",
)
def allreduce_add_rms_norm_quant_fp8(b, x, residual, weight, eps, scale, group, **_):
    """TP all_reduce, residual add, RMSNorm, fp8 quantization -> fxp.allreduce_add_rms_norm_quant_fp8"""
    return b.outputs(b.call(fxp.allreduce_add_rms_norm_quant_fp8.default, x, residual, weight, eps, scale, group), 2)
