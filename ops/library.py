"""The one ``torch.library.Library`` that owns the ``fxp`` namespace, and the helper every op module uses.

We use ``Library.define`` + ``impl`` + ``register_fake`` rather than ``torch.library.custom_op``: the schema is
written by hand (``int`` stays ``int`` instead of ``SymInt``; alias annotations such as ``Tensor(a!)[]`` are
exact) and the eager call is about half the cost (field notes: 12 µs vs 26 µs).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from fxpasses import compat

NAMESPACE = "fxp"
LIB = torch.library.Library(NAMESPACE, "DEF")

# Ops whose effect is outside their outputs (communication). AOT's dead-code elimination would otherwise
# delete e.g. a send whose buffer is never read again; fxpasses' own passes consult this set too.
SIDE_EFFECT_OPS: set[compat.OpOverload] = set()

# Ops that can run inside a captured CUDA graph on padded tokens, and how a padded token is marked:
# op -> {argument name: value for padded rows}. A graph captured for N tokens runs a smaller batch padded to N; the
# runner fills the named argument's padded rows with the value. Any other op that writes per-token state must stay
# outside the captured graphs (a splitting op). Filled by the CUDA kernels' registration (ops.triton_attention).
TOKEN_PADDING: dict[compat.OpOverload, dict[str, int]] = {}

SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def define_op(
    schema: str,
    eager: Callable,
    fake: Callable,
    *,
    side_effect: bool = False,
) -> compat.OpOverload:
    """Define ``fxp::<schema>`` with an eager kernel for every device and a fake kernel for tracing."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, eager, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    if side_effect:
        torch.fx.node.has_side_effect(overload)
        SIDE_EFFECT_OPS.add(overload)
    return overload


def check_float(op: str, **tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the argument when a tensor's dtype is not one the norms support."""
    for arg, t in tensors.items():
        if t.dtype not in SUPPORTED_FLOAT_DTYPES:
            raise ValueError(
                f"fxp.{op}: argument {arg!r} has dtype {t.dtype}; supported dtypes are "
                f"{', '.join(str(d) for d in SUPPORTED_FLOAT_DTYPES)}. Cast the input first."
            )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise a ValueError naming the argument when a tensor is not on the first argument's device.

    Without this, a CPU input with a weight on ``meta`` dispatches to the op's Meta (fake) kernel and returns
    uninitialized memory, and a CPU input with a CUDA weight dispatches to the CUDA kernel. Called from the eager,
    fake and CUDA kernels, so a mismatch fails at trace time too. Attribute reads only: it runs on every call.
    ``None`` entries (absent optional arguments) are skipped.
    """
    first_name, device = "", None
    for arg, t in tensors.items():
        if t is None:
            continue
        if device is None:
            first_name, device = arg, t.device
        elif t.device != device:
            raise ValueError(
                f"fxp.{op}: argument {arg!r} is on device {t.device} but {first_name!r} is on {device}; every "
                f"tensor argument must be on one device. Move {arg} to {device} (e.g. {arg}.to({str(device)!r}))."
            )


def check_norm_shapes(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    """Check what a norm over the last dimension needs: one device, an input with a last dimension, and a 1-D
    weight of that size; a residual of the input's shape and dtype. The CUDA kernels call it too."""
    check_same_device(op, x=x, residual=residual, weight=weight)
    if x.dim() == 0:
        raise ValueError(
            f"fxp.{op}: x is 0-d (a scalar), but the norm is over its last dimension; pass a tensor of at least "
            "one dimension (e.g. x.reshape(1))."
        )
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"fxp.{op}: weight has shape {tuple(weight.shape)} but the input's last dimension is "
            f"{x.shape[-1]}; the weight must be 1-D of that size."
        )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"fxp.{op}: residual is {tuple(residual.shape)} {residual.dtype} but x is "
            f"{tuple(x.shape)} {x.dtype}; they must have the same shape and dtype."
        )
