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

``add_rms_norm_linear`` goes one step further on the same terms: a residual add whose sum feeds an RMSNorm (any
registered spelling) whose only reader is a projection becomes ``fxp.add_rms_norm_linear``, whose kernel computes
the norm inside the projection's 1-token GEMV (one kernel instead of two; used only for the projections
``ops/triton_linear.FUSED_SHAPES`` lists, none yet: not measured on a GPU); the sum stays an output (the next
residual). The norm is rounded exactly as ``fxp.add_rms_norm`` rounds it.

The replacement changes the summation order of the matmul on CUDA where the Triton kernel runs (float32
accumulation either way), so results equal eager within bf16 GEMM tolerance there; elsewhere it is cuBLAS as
before.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fxpasses import ops
from fxpasses.patterns.matcher import EPS_SENTINEL, Match
from fxpasses.patterns.norms import check_norm, check_residual, rms_norm_spellings
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


# ---- add + RMSNorm + projection -------------------------------------------------------------------------------
def _add_norm_linear(spelling: Any) -> Any:
    def fn(x, residual, weight, eps, proj_weight):
        h = x + residual
        return F.linear(spelling(h, weight, eps), proj_weight), h

    return fn


def check_add_norm_linear(m: Match, ctx: MatchContext) -> str | None:
    x, w, p = _val(m, "x"), _val(m, "weight"), _val(m, "proj_weight")
    if x is None or w is None or p is None:
        return "the inputs carry no shape metadata (meta['val']); run fake-tensor propagation first"
    if x.device.type != "cuda":
        return f"x is on {x.device.type}; the fused kernel is for CUDA (on CPU the two ops are the same math)"
    if x.dim() != 2:
        return f"x is {tuple(x.shape)}, not [tokens, hidden]"
    if w.dtype != x.dtype or p.dtype != x.dtype:
        return f"x is {x.dtype}, the norm weight {w.dtype} and the projection {p.dtype}; they must be one dtype"
    if p.dim() != 2 or p.shape[1] != x.shape[-1]:
        return f"the projection weight {tuple(p.shape)} does not take the norm's {x.shape[-1]} features"
    return None


@pattern(
    name="add_rms_norm_linear",
    benefit=25,
    spellings=lambda: [_add_norm_linear(s) for s in rms_norm_spellings()],
    input_names=("x", "residual", "weight", "eps", "proj_weight"),
    example_inputs=lambda dtype: (torch.empty(3, 8, dtype=dtype, device="meta"),
                                  torch.empty(3, 8, dtype=dtype, device="meta"),
                                  torch.empty(8, dtype=dtype, device="meta"), EPS_SENTINEL,
                                  torch.empty(5, 8, dtype=dtype, device="meta")),
    checks=(check_norm, check_residual, check_add_norm_linear),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
)
def add_rms_norm_linear(b, x, residual, weight, eps, proj_weight, **_):
    """h = x + residual; F.linear(rms_norm(h), proj_weight) and h -> fxp.add_rms_norm_linear (norm in the GEMV)"""
    return b.outputs(b.call(fxp.add_rms_norm_linear.default, x, residual, weight, eps, proj_weight), 2)
