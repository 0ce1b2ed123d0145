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

The fused patterns go further on the same terms (CUDA, not under Inductor), each into one op whose 1-token kernel
can do the work of two or three (``ops/triton_linear.fused_config`` says where it runs fused, by measurement: the
SiLU-and-mul epilogue everywhere, the norm prologue only where it won; elsewhere the op runs the kernels the
unfused graph would, so a match never costs time):

- ``add_rms_norm_linear``: a residual add whose sum feeds an RMSNorm (any registered spelling) whose only reader
  is a projection (qkv, the LM head); the sum stays an output (the next residual). ``rms_norm_linear``: the same
  without the add (the first layer's input norm). The norm is rounded exactly as ``fxp.add_rms_norm`` rounds it.
- ``linear_silu_mul``: ``silu(gate) * up`` of a projection's two halves (``split`` into equal halves or
  ``chunk(2)``, gate first, along the last dim; also after ``silu_and_mul`` took the activation), or of two
  projections of the same ``x`` (transformers' ``gate_proj`` / ``up_proj``: the op takes both weights, nothing is
  copied). ``add_rms_norm_linear_silu_mul``: with the residual add and RMSNorm before it (a Llama layer's
  post-attention norm). At the product, both are tried before ``silu_and_mul`` (larger benefit), so the
  activation is taken with its projection wherever the whole chain has no other reader.
- Any value inside a chain with another reader (the norm's output, the product, gate or up) stops that fusion;
  the smaller patterns then take the parts (e.g. ``add_rms_norm`` + ``linear_silu_mul``), and a SwiGLU split that
  did not fuse is reported as a near miss with the reader's name (the split survives the smaller fusions, so it
  carries the explanation; a norm whose output has another reader is not reported: its nodes are gone by then).
- Under TP the add before a norm follows the previous projection's all_reduce, which stays on its own: the fused
  ops take the add and the norm where ``allreduce_add_rms_norm`` would (on a GPU that op is NCCL plus the norm
  kernel, so the fused form runs one kernel fewer).
- Transformers-style 3-D activations (``[batch, seq, hidden]``, a view around the ``mm``) are not matched, as
  for ``linear``.

The replacement changes the summation order of the matmul on CUDA where the Triton kernel runs (float32
accumulation either way), so results equal eager within bf16 GEMM tolerance there; elsewhere it is cuBLAS as
before.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from fxpasses import ops
from fxpasses.patterns.matcher import EPS_SENTINEL, SIZE_SENTINEL, Match
from fxpasses.patterns.norms import check_norm, check_residual, rms_norm_spellings
from fxpasses.patterns.registry import MatchContext, pattern

fxp = torch.ops.fxp
aten = torch.ops.aten


# The patterns that fold a norm or the SwiGLU activation into a projection (benchmarks/decode.py's "nofuse" mode
# runs without them, to measure what they change).
FUSED_PATTERNS = ("rms_norm_linear", "add_rms_norm_linear", "linear_silu_mul", "add_rms_norm_linear_silu_mul")


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


# ---- plain RMSNorm + projection (the first layer's input norm) -----------------------------------------------
def _norm_linear(spelling: Any) -> Any:
    def fn(x, weight, eps, proj_weight):
        return F.linear(spelling(x, weight, eps), proj_weight)

    return fn


@pattern(
    name="rms_norm_linear",
    benefit=12,  # below add_rms_norm_linear at the same anchor (the mm): a norm of x + residual takes the add too
    spellings=lambda: [_norm_linear(s) for s in rms_norm_spellings()],
    input_names=("x", "weight", "eps", "proj_weight"),
    example_inputs=lambda dtype: (torch.empty(3, 8, dtype=dtype, device="meta"),
                                  torch.empty(8, dtype=dtype, device="meta"), EPS_SENTINEL,
                                  torch.empty(5, 8, dtype=dtype, device="meta")),
    checks=(check_norm, check_add_norm_linear),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
)
def rms_norm_linear(b, x, weight, eps, proj_weight, **_):
    """F.linear(rms_norm(x), proj_weight) -> fxp.rms_norm_linear (norm in the GEMV)"""
    return b.call(fxp.rms_norm_linear.default, x, weight, eps, proj_weight)


# ---- gate/up projection + SiLU-and-mul (SwiGLU) ----------------------------------------------------------------
def _split_halves(y):
    return y.split([SIZE_SENTINEL, SIZE_SENTINEL], dim=-1)


def _chunk_halves(y):
    return y.chunk(2, dim=-1)


def _swiglu_spellings(halves_fns: tuple, activations: tuple) -> list[Any]:
    """``act(gate, up)`` of the halves of one fused projection (each way of taking halves), and transformers'
    ``silu(gate_proj(x)) * up_proj(x)`` with two weights. Every spelling takes ``(x, weight, up_weight)``; the
    fused forms leave ``up_weight`` unused (unbound: the replacement passes None)."""

    def fused(halves, act):
        def fn(x, weight, up_weight):
            gate, up = halves(F.linear(x, weight))
            return act(gate, up)

        return fn

    def pair(x, weight, up_weight):
        return F.silu(F.linear(x, weight)) * F.linear(x, up_weight)

    return [fused(h, a) for h in halves_fns for a in activations] + [pair]


def _silu_mul(gate, up):
    return F.silu(gate) * up


def _fxp_silu_mul(gate, up):
    return fxp.silu_and_mul(gate, up)


def check_swiglu(m: Match, ctx: MatchContext) -> str | None:
    """The halves are gate then up along the last dimension, of equal width; two weights have one shape."""
    x, w = _val(m, "x"), _val(m, "proj_weight" if "proj_weight" in m.bindings else "weight")
    if "up_weight" in m.bindings:
        u = _val(m, "up_weight")
        if u is None or w is None or u.shape != w.shape or u.dtype != w.dtype:
            got = f"{tuple(u.shape)} {u.dtype}" if u is not None else "without metadata"
            return f"the up projection's weight is {got}, not the gate's {tuple(w.shape)} {w.dtype}"
        return None
    if x is None or w is None:
        return "the inputs carry no shape metadata (meta['val']); run fake-tensor propagation first"
    if m.bindings.get("dim") != x.dim() - 1:
        return f"the projection's output is split along dim {m.bindings.get('dim')}, not the last one"
    if 2 * m.bindings.get("size", -1) != w.shape[0]:
        return (f"the projection's {w.shape[0]} outputs are split at {m.bindings.get('size')}, not into two equal "
                "halves (gate, up)")
    return None


def _is_swiglu_split(node: torch.fx.Node) -> bool:
    """A split of a CUDA tensor whose first half goes through silu into a product with the second: where a failed
    linear_silu_mul match is worth explaining (the split survives the smaller fusions that take the rest)."""
    if node.op != "call_function" or node.target not in (aten.split_with_sizes.default, aten.split.Tensor):
        return False
    val = node.meta.get("val")
    if not isinstance(val, (list, tuple)) or len(val) != 2 or val[0].device.type != "cuda":
        return False
    halves = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if set(halves) != {0, 1}:
        return False
    # silu then the product, or fxp.silu_and_mul where that smaller pattern took them (the graph is explained last)
    readers = {p for s in halves[0].users if s.target is aten.silu.default for p in s.users}
    readers |= {s for s in halves[0].users if s.target is fxp.silu_and_mul.default and s.args[:2] == (halves[0], halves[1])}
    return any(p in halves[1].users for p in readers)


def _swiglu_inputs(dtype: torch.dtype, *, norm: bool) -> tuple:
    x = torch.empty(3, 8, dtype=dtype, device="meta")
    proj = (torch.empty(2 * SIZE_SENTINEL, 8, dtype=dtype, device="meta"),
            torch.empty(2 * SIZE_SENTINEL, 8, dtype=dtype, device="meta"))
    if not norm:
        return (x, *proj)
    return (x, torch.empty(3, 8, dtype=dtype, device="meta"), torch.empty(8, dtype=dtype, device="meta"),
            EPS_SENTINEL, *proj)


@pattern(
    name="linear_silu_mul",
    benefit=8,  # above silu_and_mul at the same anchor (the product): that one would take the activation alone
    spellings=lambda: _swiglu_spellings((_split_halves, _chunk_halves), (_silu_mul, _fxp_silu_mul)),
    input_names=("x", "weight", "up_weight"),
    example_inputs=lambda dtype: _swiglu_inputs(dtype, norm=False),
    checks=(check_linear, check_swiglu),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
    hint=_is_swiglu_split,
)
def linear_silu_mul(b, x, weight, up_weight=None, **_):
    """silu(gate) * up of F.linear(x, weight)'s halves (or of two projections) -> fxp.linear_silu_mul"""
    return b.call(fxp.linear_silu_mul.default, x, weight, up_weight)


def _add_norm_swiglu(spelling: Any, swiglu: Any) -> Any:
    def fn(x, residual, weight, eps, proj_weight, up_weight):
        h = x + residual
        return swiglu(spelling(h, weight, eps), proj_weight, up_weight), h

    return fn


@pattern(
    name="add_rms_norm_linear_silu_mul",
    benefit=27,  # above linear_silu_mul at the same anchor (the product)
    spellings=lambda: [_add_norm_swiglu(s, g) for s in rms_norm_spellings()
                       for g in _swiglu_spellings((_split_halves, _chunk_halves), (_silu_mul,))],
    input_names=("x", "residual", "weight", "eps", "proj_weight", "up_weight"),
    example_inputs=lambda dtype: _swiglu_inputs(dtype, norm=True),
    checks=(check_norm, check_residual, check_add_norm_linear, check_swiglu),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
    hint=_is_swiglu_split,
)
def add_rms_norm_linear_silu_mul(b, x, residual, weight, eps, proj_weight, up_weight=None, **_):
    """h = x + residual; silu(gate) * up of F.linear(rms_norm(h), ...) and h -> fxp.add_rms_norm_linear_silu_mul"""
    return b.outputs(b.call(fxp.add_rms_norm_linear_silu_mul.default, x, residual, weight, eps, proj_weight,
                            up_weight), 2)
