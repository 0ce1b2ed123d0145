"""RMSNorm and its fused forms: add + RMSNorm, all-reduce + add + RMSNorm.

The reference math is exactly what the models users run compute (transformers' ``LlamaRMSNorm``): normalize in
float32, cast back to the input dtype, then multiply by the weight. Matching that order bit for bit is what lets
a pattern rewrite keep bf16 results identical to eager on CPU.
"""
from __future__ import annotations

import torch

from fxpasses.ops.library import check_float, check_norm_shapes, define_op


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Functional sum all-reduce, the same ops the models' ``funcol.all_reduce`` traces to."""
    out = torch.ops._c10d_functional.all_reduce(x, "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


# rms_norm(Tensor x, Tensor weight, float eps) -> Tensor
def _rms_norm(x, weight, eps):
    check_float("rms_norm", x=x, weight=weight)
    check_norm_shapes("rms_norm", x, weight)
    return rms_norm_reference(x, weight, eps)


def _rms_norm_fake(x, weight, eps):
    check_float("rms_norm", x=x, weight=weight)
    check_norm_shapes("rms_norm", x, weight)
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


rms_norm = define_op("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", _rms_norm, _rms_norm_fake)


# add_rms_norm: residual_out = x + residual; out = rms_norm(residual_out)
def _add_rms_norm(x, residual, weight, eps):
    check_float("add_rms_norm", x=x, residual=residual, weight=weight)
    check_norm_shapes("add_rms_norm", x, weight, residual)
    residual_out = x + residual
    return rms_norm_reference(residual_out, weight, eps), residual_out


def _add_rms_norm_fake(x, residual, weight, eps):
    check_float("add_rms_norm", x=x, residual=residual, weight=weight)
    check_norm_shapes("add_rms_norm", x, weight, residual)
    return _rms_norm_fake(x, weight, eps), torch.empty_like(x)


add_rms_norm = define_op(
    "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor out, Tensor residual_out)",
    _add_rms_norm,
    _add_rms_norm_fake,
)


def _allreduce_add_rms_norm(x, residual, weight, eps, group_name):
    # check before the collective: a bad argument must not leave the other ranks waiting in a half-done all_reduce
    check_float("allreduce_add_rms_norm", x=x, residual=residual, weight=weight)
    check_norm_shapes("allreduce_add_rms_norm", x, weight, residual)
    # through the dispatcher, so CUDA tensors get the CUDA kernel
    return torch.ops.fxp.add_rms_norm.default(all_reduce_sum(x, group_name), residual, weight, eps)


def _allreduce_add_rms_norm_fake(x, residual, weight, eps, group_name):
    check_float("allreduce_add_rms_norm", x=x, residual=residual, weight=weight)
    check_norm_shapes("allreduce_add_rms_norm", x, weight, residual)
    return _add_rms_norm_fake(x, residual, weight, eps)


allreduce_add_rms_norm = define_op(
    "allreduce_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, str group_name)"
    " -> (Tensor out, Tensor residual_out)",
    _allreduce_add_rms_norm,
    _allreduce_add_rms_norm_fake,
)
