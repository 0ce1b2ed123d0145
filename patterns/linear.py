"""The ``linear`` pattern: ``mm(x, t(w))`` and ``addmm(b, x, t(w))`` (what AOT makes of ``F.linear``) ->
``fxp.linear``, whose CUDA kernel picks a Triton GEMV / small-M kernel or cuBLAS per token count.

Where it applies, and why:

- **Not under Inductor** (``applies``): Inductor chooses its own GEMM kernels (and may fuse around them); an
  opaque op would stop that.
- **On CUDA tensors only** (a check): on the CPU the op is ``F.linear`` itself, so replacing the matmul would
  change nothing but the graph. On CUDA the op's kernel choice is made per call, i.e. once per captured size under
  CUDA graphs, where the small projections of a decode step run at about twice cuBLAS's bandwidth (measured in
  docs/performance.md).
- **Only where ``F.linear`` computes the same thing**: 2-D ``x`` (``mm``'s contract), ``x`` and ``w`` of one
  float dtype, and for ``addmm`` a 1-D bias of ``N`` elements in that dtype (``addmm`` also broadcasts a
  ``[M, N]`` or ``[1, N]`` bias: left alone). ``addmm``'s ``beta``/``alpha`` are matched at their defaults only
  (the traced spelling has none).

The replacement changes the summation order of the matmul on CUDA where the Triton kernel runs (float32
accumulation either way), so results equal eager within bf16 GEMM tolerance there; elsewhere it is cuBLAS as
before.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fxpasses import ops
from fxpasses.patterns.matcher import Match
from fxpasses.patterns.registry import MatchContext, pattern

fxp = torch.ops.fxp


def _val(m: Match, name: str) -> Any:
    v = m.bindings.get(name)
    return v.meta.get("val") if isinstance(v, torch.fx.Node) else None


def check_linear(m: Match, ctx: MatchContext) -> str | None:
    x, w = _val(m, "x"), _val(m, "weight")
    if x is None or w is None:
        return "the inputs carry no shape metadata (meta['val']); run fake-tensor propagation first"
    if x.device.type != "cuda":
        return f"x is on {x.device.type}, where fxp.linear is F.linear itself (it picks kernels on CUDA only)"
    if x.dim() != 2 or w.dim() != 2:
        return f"x {tuple(x.shape)} and weight {tuple(w.shape)} must both be 2-D"
    if x.dtype != w.dtype or x.dtype not in ops.SUPPORTED_FLOAT_DTYPES:
        return f"x is {x.dtype} and weight is {w.dtype}; they must be one of float32, bfloat16, float16"
    if "bias" in m.bindings:
        b = _val(m, "bias")
        if b is None or b.dim() != 1 or b.shape[0] != w.shape[0] or b.dtype != x.dtype:
            got = f"{tuple(b.shape)} {b.dtype}" if b is not None else "without metadata"
            return f"the bias is {got}, not 1-D of out_features ({w.shape[0]}) in {x.dtype}"
    return None


def eager_only(mapping: Any, config: Any) -> bool:
    return config is None or getattr(config, "defunctionalize", True)


def _inputs(with_bias: bool):
    def example(dtype: torch.dtype) -> tuple:
        x, w = torch.empty(3, 8, dtype=dtype, device="meta"), torch.empty(5, 8, dtype=dtype, device="meta")
        return (x, w, torch.empty(5, dtype=dtype, device="meta")) if with_bias else (x, w)

    return example


@pattern(
    name="linear",
    benefit=3,
    spellings=lambda: [lambda x, weight: F.linear(x, weight)],
    input_names=("x", "weight"),
    example_inputs=_inputs(False),
    checks=(check_linear,),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
)
def linear(b, x, weight, **_):
    """mm(x, t(weight)) -> fxp.linear(x, weight)"""
    return b.call(fxp.linear.default, x, weight, None)


@pattern(
    name="linear_bias",
    benefit=4,
    spellings=lambda: [lambda x, weight, bias: F.linear(x, weight, bias)],
    input_names=("x", "weight", "bias"),
    example_inputs=_inputs(True),
    checks=(check_linear,),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
)
def linear_bias(b, x, weight, bias, **_):
    """addmm(bias, x, t(weight)) -> fxp.linear(x, weight, bias)"""
    return b.call(fxp.linear.default, x, weight, bias)
