"""Elementwise-chain patterns: ``rotary_embedding`` (rotate-half RoPE) and ``silu_and_mul`` (SwiGLU's activation).

They apply on the non-Inductor path only: there each ATen op is a kernel, and these chains are most of a decode
step's kernels. Inductor fuses them itself, and an opaque op in their place would stop it (``applies``).

RoPE is matched in four spellings: the rotation by ``chunk`` (reference models, vLLM's native form) or by slicing
(transformers' ``rotate_half``), each computed in float32 and cast back once, or in the input dtype. The cast
decides the op's ``upcast`` flag, so the replacement rounds exactly where the spelling did.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fxpasses import ops
from fxpasses.patterns.matcher import SIZE_SENTINEL, Match
from fxpasses.patterns.registry import MatchContext, pattern

fxp = torch.ops.fxp
aten = torch.ops.aten


def _rotate_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_slice(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _upcast(rotate):
    def spelling(x, cos, sin):
        xf = x.float()
        return (xf * cos + rotate(xf) * sin).to(x.dtype)

    return spelling


def _in_dtype(rotate):
    def spelling(x, cos, sin):
        return x * cos + rotate(x) * sin

    return spelling


def _rotary_inputs(dtype: torch.dtype) -> tuple:
    dim = 2 * SIZE_SENTINEL  # half the rotary dimension is the "size" wildcard
    return (torch.empty(3, 2, dim, dtype=dtype, device="meta"), torch.empty(3, 1, dim, dtype=dtype, device="meta"),
            torch.empty(3, 1, dim, dtype=dtype, device="meta"))


def _val(m: Match, name: str) -> Any:
    v = m.bindings.get(name)
    return v.meta.get("val") if isinstance(v, torch.fx.Node) else None


def check_rotary(m: Match, ctx: MatchContext) -> str | None:
    x, cos, sin = _val(m, "x"), _val(m, "cos"), _val(m, "sin")
    if x is None or cos is None or sin is None:
        return "the inputs carry no shape metadata (meta['val']); run fake-tensor propagation first"
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if t.dtype not in ops.SUPPORTED_FLOAT_DTYPES:
            return f"{name} is {t.dtype}, not a supported float dtype"
    if m.bindings.get("dim") != x.dim() - 1:
        return f"the halves are taken along dim {m.bindings.get('dim')}, not the last one"
    if 2 * m.bindings.get("size", -1) != x.shape[-1]:
        return f"the rotation splits at {m.bindings.get('size')}, not at half of the last dimension {x.shape[-1]}"
    if "dtype" in m.bindings and m.bindings["dtype"] != x.dtype:
        return f"the result is cast to {m.bindings['dtype']}, not back to the input dtype {x.dtype}"
    try:
        shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
    except RuntimeError:
        return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} do not broadcast to x {tuple(x.shape)}"
    if tuple(shape) != tuple(x.shape):
        return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} enlarge x {tuple(x.shape)} when broadcast"
    return None


def eager_only(mapping: Any, config: Any) -> bool:
    return config is None or getattr(config, "defunctionalize", True)


def _is_rotate_half(node: torch.fx.Node) -> bool:
    """A cat with a negated operand: where a rotation is written, so a failed match there is worth explaining."""
    return (node.op == "call_function" and node.target is aten.cat.default
            and any(isinstance(a, torch.fx.Node) and a.target is aten.neg.default for a in node.args[0]))


@pattern(
    name="rotary_embedding",
    benefit=10,
    spellings=lambda: [f(r) for f in (_upcast, _in_dtype) for r in (_rotate_chunk, _rotate_slice)],
    input_names=("x", "cos", "sin"),
    example_inputs=_rotary_inputs,
    checks=(check_rotary,),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor fuses the chain itself)",
    explain_when_off=False,
    hint=_is_rotate_half,
)
def rotary_embedding(b, x, cos, sin, **bindings):
    """x * cos + rotate_half(x) * sin (chunk or slice halves; float32 or input dtype) -> fxp.rotary_embedding"""
    return b.call(fxp.rotary_embedding.default, x, cos, sin, "dtype" in bindings)


def check_silu_and_mul(m: Match, ctx: MatchContext) -> str | None:
    gate, up = _val(m, "gate"), _val(m, "up")
    if gate is None or up is None:
        return "the inputs carry no shape metadata (meta['val']); run fake-tensor propagation first"
    if gate.shape != up.shape:
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape (the product broadcasts)"
    if gate.dtype not in ops.SUPPORTED_FLOAT_DTYPES or up.dtype not in ops.SUPPORTED_FLOAT_DTYPES:
        return f"gate is {gate.dtype} and up is {up.dtype}; supported: float32, bfloat16, float16"
    return None


@pattern(
    name="silu_and_mul",
    benefit=5,
    spellings=lambda: [lambda gate, up: F.silu(gate) * up],
    input_names=("gate", "up"),
    example_inputs=lambda dtype: (torch.empty(3, 8, dtype=dtype, device="meta"),
                                  torch.empty(3, 8, dtype=dtype, device="meta")),
    checks=(check_silu_and_mul,),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor fuses the chain itself)",
    explain_when_off=False,
)
def silu_and_mul(b, gate, up, **_):
    """silu(gate) * up -> fxp.silu_and_mul"""
    return b.call(fxp.silu_and_mul.default, gate, up)
