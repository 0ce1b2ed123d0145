"""The ``linear`` pattern: ``mm(x, t(w))`` and ``addmm(b, x, t(w))`` (what AOT makes of ``F.linear``) ->
``fxp.linear``, whose CUDA kernel picks a Triton GEMV / small-M kernel or cuBLAS per token count.

Where it applies, and why:

- **Not under Inductor** (``applies``): Inductor chooses its own GEMM kernels (and may fuse around them); an
  opaque op would stop that.
- **On CUDA tensors only** (a check): on the CPU the op is ``F.linear`` itself, so replacing the matmul would
  change nothing but the graph. On CUDA the op's kernel choice is made per call, i.e. once per captured size under
  CUDA graphs, where the small projections of a decode step run at about twice cuBLAS's bandwidth (measured in
  docs/performance.md).
- **Only where ``F.linear`` computes the same thing**: 2-D ``x`` (``mm``'s contract; an N-D ``x`` through the
  views described below), ``x`` and ``w`` of one float dtype, and for ``addmm`` a 1-D bias of ``N`` elements in
  that dtype (``addmm`` also broadcasts a ``[M, N]`` or ``[1, N]`` bias: left alone). ``addmm``'s
  ``beta``/``alpha`` are matched at their defaults only (the traced spelling has none).

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
- Transformers-style N-D activations (``[batch, seq, hidden]``): AOT spells ``F.linear`` on them as
  ``view(x, [B*S, K]) -> mm / addmm -> view or _unsafe_view(., [B, S, N])``. Every pattern above matches through
  those views, and the op takes ``x`` itself (each fxp projection op accepts ``[..., K]``; on the CPU it is
  ``F.linear`` of the N-D ``x``, which AOT decomposed into exactly these views and product, so bit-identical):
  ``linear`` / ``linear_bias`` where the ``mm`` is read only by the view back; the norm fusions for
  ``add -> RMSNorm (3-D) -> view -> mm -> view``; the SwiGLU fusions for ``silu(gate) * up`` of two 3-D
  projections (``gate_proj`` / ``up_proj``) or the halves of one. The traced spellings cannot name the views (their
  sizes are the call site's literals), so the N-D spellings match the 2-D core (the ``mm``, or wildcards standing
  for the projections' outputs) and checks named ``_nd_*`` walk out through the views, verify them, match the
  norm with the norm patterns' own spellings and checks, and widen the match to cover the whole chain.
- The views are folded only where that cannot change a result: the flattening view merges leading dims of a
  contiguous activation and keeps its last dim; the product is viewed back to exactly the activation's leading
  dims (``[2, 3] -> [6] -> [3, 2]`` would regroup the batch); inside a fusion, no value (the norm's output, its
  flattening view, a projection's output) has another reader. Elsewhere ``linear`` fuses the 2-D product as
  before (the views stay) and a near miss says why when the product is viewed back to N-D; ``F.linear`` of a
  non-contiguous activation (e.g. after a transpose) is traced as ``expand + bmm``, which no pattern takes, and is
  reported as a near miss with that advice. A flattening view that is also read elsewhere does not stop a plain
  ``linear`` (the view is an input there and stays for its other reader).

The replacement changes the summation order of the matmul on CUDA where the Triton kernel runs (float32
accumulation either way), so results equal eager within bf16 GEMM tolerance there; elsewhere it is cuBLAS as
before.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx
import torch.nn.functional as F

from fxpasses import ops
from fxpasses.patterns.matcher import EPS_SENTINEL, SIZE_SENTINEL, Match, MatchFailure, match
from fxpasses.patterns.norms import check_norm, check_residual, rms_norm_spellings
from fxpasses.patterns.registry import MatchContext, holds_cuda_tensor, pattern, traced_variants

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
    if x.dim() < 2 or w.dim() != 2:
        return f"x {tuple(x.shape)} must be [..., in_features] (2-D or more) and weight {tuple(w.shape)} 2-D"
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


# ---- N-D activations: the views around a transformers-style projection ----------------------------------------
# AOT spells F.linear on an N-D x as view(x, [tokens, K]) -> mm / addmm -> view back to [..., N] (torch 2.13: the
# bias-free matmul fold ends in _unsafe_view, the biased one in view; view, _unsafe_view and reshape are all
# accepted, so which one a torch version emits does not matter). The traced spellings cannot name these views (their
# sizes are literals of the call site), so the patterns below match the 2-D core (the mm, or a wildcard standing for
# the projection's output) and the ``_nd_*`` checks walk out through the views, verify them and widen the Match to
# cover them (its nodes, bindings and, for a residual add, its outputs: what the driver replaces and erases); the
# replacement then takes the N-D activation itself (every fxp projection op accepts [..., K]).
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _tensor(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is_call(node: Any, targets: Iterable[Any]) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in tuple(targets)


@dataclass(frozen=True)
class _Projection:
    """One N-D projection as AOT spells it: ``unflatten(mm(flatten(source), t(weight)))``."""

    source: torch.fx.Node  # the N-D activation [..., K]
    flatten: torch.fx.Node  # view(source, [tokens, K])
    mm: torch.fx.Node
    transpose: torch.fx.Node  # t(weight)
    weight: torch.fx.Node
    unflatten: torch.fx.Node  # view(mm, [..., N])

    @property
    def nodes(self) -> tuple[torch.fx.Node, ...]:
        return (self.unflatten, self.mm, self.transpose, self.flatten)


def _flattened(view: torch.fx.Node) -> "tuple[torch.fx.Node | None, str | None]":
    """The N-D tensor that ``view`` flattens to ``[tokens, K]`` by merging only its leading dims, with its last
    dim untouched and contiguous (so the op reads the same elements in the same order): (source, None), or
    (None, why not)."""
    if not _is_call(view, _VIEWS):
        return None, None
    src = view.args[0]
    s, v = _tensor(src), _tensor(view)
    if s is None or v is None:
        return None, f"the view {view.name} carries no shape metadata"
    if v.dim() != 2 or s.dim() < 2:
        return None, f"{view.name} views {tuple(s.shape)} as {tuple(v.shape)}, not a flatten to [tokens, K]"
    if s.shape[-1] != v.shape[-1]:
        return None, (f"the view {view.name} changes the last dim ({tuple(s.shape)} -> {tuple(v.shape)}): the "
                      "projection does not act on the activation's last dim, so it stays a 2-D product")
    if not s.is_contiguous():
        return None, (f"the activation {src.name} {tuple(s.shape)} is not contiguous (strides {tuple(s.stride())}); "
                      "F.linear on it would not be this product")
    return src, None


def _projection_at(mm: torch.fx.Node) -> "tuple[_Projection | None, str | None]":
    """The N-D projection around ``mm`` = mm(flatten, t(weight)) or addmm(bias, flatten, t(weight)): its source
    and unflattening view, or (None, why it stays 2-D)."""
    flatten, transpose = mm.args[-2:] if mm.target is aten.addmm.default else mm.args[:2]
    if not _is_call(transpose, (aten.t.default,)):
        return None, f"the weight reaches {mm.name} through {getattr(transpose, 'name', transpose)}, not t(weight)"
    weight = transpose.args[0]
    src, why = _flattened(flatten)
    if src is None:
        return None, why or f"x ({getattr(flatten, 'name', flatten)}) is not a view of an N-D activation"
    users = list(mm.users)
    if len(users) != 1 or not _is_call(users[0], _VIEWS):
        names = ", ".join(u.name for u in users) or "nothing"
        return None, (f"the product {mm.name} is read by {names}, not by one view back to the activation's "
                      "leading dims")
    out, s, o = users[0], _tensor(src), _tensor(users[0])
    w = _tensor(weight)
    if o is None or w is None:
        return None, f"the view {out.name} carries no shape metadata"
    want = (*s.shape[:-1], w.shape[0])
    if tuple(o.shape) != want:
        return None, (f"the product is reshaped to {tuple(o.shape)}, not to the activation's leading dims "
                      f"{tuple(s.shape[:-1])} + ({w.shape[0]},): folding the views would change which rows "
                      "form the batch")
    return _Projection(src, flatten, mm, transpose, weight, out), None


def _projection_of(out: Any) -> "tuple[_Projection | None, str | None]":
    """``out`` = unflatten(mm(flatten(source), t(weight))), found from the output side."""
    name = getattr(out, "name", repr(out))
    if not _is_call(out, _VIEWS):
        return None, f"{name} is not the view that ends an N-D projection (unflatten(mm(flatten(x), t(w))))"
    mm = out.args[0]
    if not _is_call(mm, (aten.mm.default,)):
        return None, f"{name} views {getattr(mm, 'name', mm)}, not a bias-free mm (the fused ops take no bias)"
    return _projection_at(mm)


def _only_read_by(node: torch.fx.Node, readers: Iterable[torch.fx.Node]) -> torch.fx.Node | None:
    """A reader of ``node`` outside ``readers`` (None if there is none)."""
    allowed = set(readers)
    return next((u for u in node.users if u not in allowed), None)


def _add_nodes(m: Match, nodes: Iterable[torch.fx.Node]) -> None:
    """Widen ``m`` by graph nodes (each once: the driver erases a matched node that has no reader left)."""
    present = set(m.nodes.values())
    for n in nodes:
        if n not in present:
            m.nodes[id(n)] = n  # keyed by the node's own id, which no pattern node has
            present.add(n)


def _repoint_anchor(m: Match, node: torch.fx.Node) -> None:
    """Make ``node`` the value the replacement's first output replaces (the unflattening view, not the mm)."""
    anchor = m.pattern.outputs[0]
    old = m.nodes[id(anchor)]
    m.nodes[id(anchor)] = node
    _add_nodes(m, [old])


def _norm_at(source: torch.fx.Node, with_add: bool, ctx: MatchContext) -> "tuple[Match | None, str | None]":
    """Match the RMSNorm (with its residual add: ``add_rms_norm``'s spellings) whose output is ``source``, with the
    norm patterns' own traced spellings and checks."""
    best: MatchFailure | None = None
    for variant in traced_variants("add_rms_norm" if with_add else "rms_norm"):
        try:
            sub = match(variant, source)
        except MatchFailure as failure:
            best = failure if best is None or failure.reached > best.reached else best
            continue
        for check in (check_norm, check_residual) if with_add else (check_norm,):
            reason = check(sub, ctx)
            if reason:
                return None, reason
        return sub, None
    why = best.reason if best is not None else "no RMSNorm spelling is registered"
    return None, f"the projected activation {source.name} is not {'a residual add + ' if with_add else 'an '}RMSNorm ({why})"


def _take_norm(m: Match, sub: Match, with_add: bool) -> None:
    """Widen ``m`` by the norm's match: its bindings (x, residual, weight, eps, ...) and nodes; with the add, the
    sum (the next residual) becomes the replacement's second output."""
    m.bindings.update(sub.bindings)
    m.nodes.update(sub.nodes)
    if with_add:
        m.pattern = dataclasses.replace(m.pattern, outputs=[m.pattern.outputs[0], sub.pattern.outputs[1]])


def _nd_linear(m: Match, ctx: MatchContext) -> str | None:
    """``linear`` / ``linear_bias``: where x is the flattening view of an N-D activation and the product's only
    reader views it back to the activation's leading dims, the op takes the activation and replaces that view.
    Elsewhere the 2-D product fuses as before (exact either way); a flatten view with other readers stays for
    them (it is an input here, nothing is computed twice). Never fails: the 2-D match stands."""
    if _tensor(m.bindings.get("x")) is None or _tensor(m.bindings["x"]).device.type != "cuda":
        return None
    proj, _ = _projection_at(m.anchor)
    if proj is None or proj.flatten is not m.bindings["x"]:
        return None
    m.bindings["x"] = proj.source
    _repoint_anchor(m, proj.unflatten)
    _add_nodes(m, [proj.flatten])
    return None


def _nd_norm_linear(with_add: bool):
    def check(m: Match, ctx: MatchContext) -> str | None:
        """The 3-D spelling of (add_)rms_norm_linear: mm(x, t(proj_weight)) where x flattens the norm's N-D
        output, and the norm (with its add) matched and checked by the norm patterns' spellings and checks."""
        if "eps" in m.bindings:  # a 2-D spelling: the norm is in the match already
            return None
        x = _tensor(m.bindings.get("x"))
        if x is None or x.device.type != "cuda":
            return "x is not a CUDA tensor (the fused kernel is for CUDA)"
        proj, why = _projection_at(m.anchor)
        if proj is None:
            return why
        other = _only_read_by(proj.source, [proj.flatten]) or _only_read_by(proj.flatten, [proj.mm])
        if other is not None:
            _add_nodes(m, [proj.flatten])
            return (f"the normalized activation {proj.source.name} is also read by {other.name} (the norm is needed "
                    "on its own: each projection of it stays separate)")
        sub, why = _norm_at(proj.source, with_add, ctx)
        if sub is None:
            return why
        _repoint_anchor(m, proj.unflatten)
        _add_nodes(m, [proj.flatten])
        _take_norm(m, sub, with_add)
        return None

    return check


def _nd_swiglu(norm: bool):
    weight_name = "proj_weight" if norm else "weight"

    def check(m: Match, ctx: MatchContext) -> str | None:
        """The 3-D spellings of the SwiGLU fusions: ``act(gate, up)`` of wildcards that must be N-D projections
        of one activation (two, or the two halves of one), that activation a norm's output for the norm form."""
        outs = [m.bindings[k] for k in ("gate_out", "up_out", "proj_out") if k in m.bindings]
        if not outs:  # a 2-D spelling
            return None
        first = _tensor(outs[0])
        if first is None or first.device.type != "cuda":
            return "the projection is not on CUDA (the fused kernel is for CUDA)"
        projs = []
        for out in outs:
            proj, why = _projection_of(out)
            if proj is None:
                return why
            projs.append(proj)
        source = projs[0].source
        if any(p.source is not source for p in projs):
            return "the gate and up projections read different activations"
        chain = [n for p in projs for n in p.nodes]
        for p in projs:
            other = _only_read_by(p.unflatten, m.graph_nodes)
            if other is not None:
                return f"the projection's output {p.unflatten.name} has another reader ({other.name})"
        sub = None
        if norm:  # the norm's output (and its flattening views) must be read by these projections only
            other = _only_read_by(source, [p.flatten for p in projs]) or next(
                (o for p in projs if (o := _only_read_by(p.flatten, [q.mm for q in projs])) is not None), None)
            if other is not None:
                _add_nodes(m, chain)
                return (f"the normalized activation {source.name} is also read by {other.name} (the norm is needed "
                        "on its own)")
            sub, why = _norm_at(source, True, ctx)
            if sub is None:
                return why
        for k in ("gate_out", "up_out", "proj_out"):
            m.bindings.pop(k, None)
        m.bindings.update({"x": source, weight_name: projs[0].weight})
        if len(projs) == 2:
            m.bindings["up_weight"] = projs[1].weight
        _add_nodes(m, chain)
        if sub is not None:
            _take_norm(m, sub, True)
        return None

    return check


def _why_not_nd(node: torch.fx.Node) -> str | None:
    """For near misses: why a projection of an N-D activation on CUDA was left 2-D (an ``fxp.linear`` reading a
    view of a 3-D or larger activation, whose product is viewed back to N-D), or is not a projection the patterns
    take (a batched matmul); None where there is nothing to explain (a product meant to be 2-D, such as heads merged
    into the hidden dim before o_proj, or tokens flattened for good)."""
    if _is_call(node, (fxp.linear.default,)):
        x, w = _tensor(node.args[0]), _tensor(node.args[1])
        if x is None or w is None or x.device.type != "cuda" or not _is_call(node.args[0], _VIEWS):
            return None
        src = node.args[0].args[0]
        s = _tensor(src)
        back = [u for u in node.users if _is_call(u, _VIEWS) and _tensor(u) is not None and _tensor(u).dim() >= 3]
        if s is None or s.dim() < 3 or not back:
            return None
        _, why = _flattened(node.args[0])
        if why is None:
            want = (*s.shape[:-1], w.shape[0])
            wrong = [u for u in back if tuple(_tensor(u).shape) != want]
            if wrong:
                why = (f"its result is reshaped to {tuple(_tensor(wrong[0]).shape)}, not viewed back to the "
                       f"activation's leading dims {tuple(s.shape[:-1])}: folding the views would change which rows "
                       "form the batch")
            elif len(node.users) > 1:
                others = ", ".join(u.name for u in node.users if u not in back)
                why = f"the 2-D product is also read by {others}"
            else:
                return None
        return f"the N-D activation {src.name} {tuple(s.shape)} is projected 2-D (the views stay): {why}"
    if _is_call(node, (aten.bmm.default,)):
        x, rhs = _tensor(node.args[0]), node.args[1]
        if x is None or x.device.type != "cuda":
            return None
        # F.linear of a non-contiguous N-D activation: bmm(view(expand(x)), view(expand(t(weight))))
        inner = rhs.args[0] if _is_call(rhs, (aten.view.default,)) else rhs
        inner = inner.args[0] if _is_call(inner, (aten.expand.default,)) else None
        if not _is_call(inner, (aten.t.default,)):
            return None
        return ("F.linear of a non-contiguous N-D activation was traced as a batched matmul (expand + bmm), which "
                "the linear patterns do not take: make the activation contiguous (.contiguous(), or do not "
                "transpose it) before the projection to have it fused")
    return None


def _explains_nd(node: torch.fx.Node) -> bool:
    return _why_not_nd(node) is not None


def _inputs(with_bias: bool):
    def example(dtype: torch.dtype) -> tuple:
        x, w = torch.empty(3, 8, dtype=dtype, device="meta"), torch.empty(5, 8, dtype=dtype, device="meta")
        return (x, w, torch.empty(5, dtype=dtype, device="meta")) if with_bias else (x, w)

    return example


@pattern(
    name="linear",
    needs=holds_cuda_tensor,
    benefit=3,
    spellings=lambda: [lambda x, weight: F.linear(x, weight)],
    input_names=("x", "weight"),
    example_inputs=_inputs(False),
    checks=(check_linear, _nd_linear),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
    hint=_explains_nd,
    explain=_why_not_nd,
)
def linear(b, x, weight, **_):
    """mm(x, t(weight)) -> fxp.linear(x, weight); with the views around it, of the N-D x"""
    return b.call(fxp.linear.default, x, weight, None)


@pattern(
    name="linear_bias",
    needs=holds_cuda_tensor,
    benefit=4,
    spellings=lambda: [lambda x, weight, bias: F.linear(x, weight, bias)],
    input_names=("x", "weight", "bias"),
    example_inputs=_inputs(True),
    checks=(check_linear, _nd_linear),
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
    if x.dim() < 2:
        return f"x is {tuple(x.shape)}, not [..., tokens, hidden]"
    if w.dtype != x.dtype or p.dtype != x.dtype:
        return f"x is {x.dtype}, the norm weight {w.dtype} and the projection {p.dtype}; they must be one dtype"
    if p.dim() != 2 or p.shape[1] != x.shape[-1]:
        return f"the projection weight {tuple(p.shape)} does not take the norm's {x.shape[-1]} features"
    return None


@pattern(
    name="add_rms_norm_linear",
    needs=holds_cuda_tensor,
    benefit=25,
    spellings=lambda: [_add_norm_linear(s) for s in rms_norm_spellings()] + [_projection_only],
    input_names=("x", "residual", "weight", "eps", "proj_weight"),
    example_inputs=lambda dtype: (torch.empty(3, 8, dtype=dtype, device="meta"),
                                  torch.empty(3, 8, dtype=dtype, device="meta"),
                                  torch.empty(8, dtype=dtype, device="meta"), EPS_SENTINEL,
                                  torch.empty(5, 8, dtype=dtype, device="meta")),
    checks=(_nd_norm_linear(True), check_norm, check_residual, check_add_norm_linear),
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


def _projection_only(*args: Any) -> Any:
    """The N-D spelling's core, ``mm(x, t(proj_weight))`` (the last argument): the norm beyond the flattening view
    is matched by ``_nd_norm_linear``."""
    return F.linear(args[0], args[-1])


@pattern(
    name="rms_norm_linear",
    needs=holds_cuda_tensor,
    benefit=12,  # below add_rms_norm_linear at the same anchor (the mm): a norm of x + residual takes the add too
    spellings=lambda: [_norm_linear(s) for s in rms_norm_spellings()] + [_projection_only],
    input_names=("x", "weight", "eps", "proj_weight"),
    example_inputs=lambda dtype: (torch.empty(3, 8, dtype=dtype, device="meta"),
                                  torch.empty(8, dtype=dtype, device="meta"), EPS_SENTINEL,
                                  torch.empty(5, 8, dtype=dtype, device="meta")),
    checks=(_nd_norm_linear(False), check_norm, check_add_norm_linear),
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
        def fn(x, weight, up_weight, *_):
            gate, up = halves(F.linear(x, weight))
            return act(gate, up)

        return fn

    def pair(x, weight, up_weight, *_):
        return F.silu(F.linear(x, weight)) * F.linear(x, up_weight)

    return [fused(h, a) for h in halves_fns for a in activations] + [pair]


def _swiglu_nd_spellings(halves_fns: tuple, activations: tuple) -> list[Any]:
    """The N-D forms: ``act(gate, up)`` of wildcards standing for the projections' outputs (``gate_out`` /
    ``up_out`` of two projections, the halves of ``proj_out``), each resolved through its views by
    ``_nd_swiglu``. Every spelling takes all the pattern's inputs (the last three are these)."""

    def halves_of(halves, act):
        def fn(*args):
            gate, up = halves(args[-1])
            return act(gate, up)

        return fn

    def pair(*args):
        return F.silu(args[-3]) * args[-2]

    return [halves_of(h, a) for h in halves_fns for a in activations] + [pair]


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


_SWIGLU_ND_INPUTS = ("gate_out", "up_out", "proj_out")


def _swiglu_inputs(dtype: torch.dtype, *, norm: bool) -> tuple:
    x = torch.empty(3, 8, dtype=dtype, device="meta")
    proj = (torch.empty(2 * SIZE_SENTINEL, 8, dtype=dtype, device="meta"),
            torch.empty(2 * SIZE_SENTINEL, 8, dtype=dtype, device="meta"))
    outs = (torch.empty(3, SIZE_SENTINEL, dtype=dtype, device="meta"),
            torch.empty(3, SIZE_SENTINEL, dtype=dtype, device="meta"),
            torch.empty(3, 2 * SIZE_SENTINEL, dtype=dtype, device="meta"))
    if not norm:
        return (x, *proj, *outs)
    return (x, torch.empty(3, 8, dtype=dtype, device="meta"), torch.empty(8, dtype=dtype, device="meta"),
            EPS_SENTINEL, *proj, *outs)


@pattern(
    name="linear_silu_mul",
    needs=holds_cuda_tensor,
    benefit=8,  # above silu_and_mul at the same anchor (the product): that one would take the activation alone
    spellings=lambda: (_swiglu_spellings((_split_halves, _chunk_halves), (_silu_mul, _fxp_silu_mul))
                       + _swiglu_nd_spellings((_split_halves, _chunk_halves), (_silu_mul, _fxp_silu_mul))),
    input_names=("x", "weight", "up_weight", *_SWIGLU_ND_INPUTS),
    example_inputs=lambda dtype: _swiglu_inputs(dtype, norm=False),
    checks=(_nd_swiglu(norm=False), check_linear, check_swiglu),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
    hint=_is_swiglu_split,
)
def linear_silu_mul(b, x, weight, up_weight=None, **_):
    """silu(gate) * up of F.linear(x, weight)'s halves (or of two projections) -> fxp.linear_silu_mul"""
    return b.call(fxp.linear_silu_mul.default, x, weight, up_weight)


def _add_norm_swiglu(spelling: Any, swiglu: Any) -> Any:
    def fn(x, residual, weight, eps, proj_weight, up_weight, gate_out, up_out, proj_out):
        h = x + residual
        return swiglu(spelling(h, weight, eps), proj_weight, up_weight), h

    return fn


@pattern(
    name="add_rms_norm_linear_silu_mul",
    needs=holds_cuda_tensor,
    benefit=27,  # above linear_silu_mul at the same anchor (the product)
    spellings=lambda: ([_add_norm_swiglu(s, g) for s in rms_norm_spellings()
                        for g in _swiglu_spellings((_split_halves, _chunk_halves), (_silu_mul,))]
                       + _swiglu_nd_spellings((_split_halves, _chunk_halves), (_silu_mul,))),
    input_names=("x", "residual", "weight", "eps", "proj_weight", "up_weight", *_SWIGLU_ND_INPUTS),
    example_inputs=lambda dtype: _swiglu_inputs(dtype, norm=True),
    checks=(_nd_swiglu(norm=True), check_norm, check_residual, check_add_norm_linear, check_swiglu),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor picks its own GEMM kernels)",
    explain_when_off=False,
    hint=_is_swiglu_split,
)
def add_rms_norm_linear_silu_mul(b, x, residual, weight, eps, proj_weight, up_weight=None, **_):
    """h = x + residual; silu(gate) * up of F.linear(rms_norm(h), ...) and h -> fxp.add_rms_norm_linear_silu_mul"""
    return b.outputs(b.call(fxp.add_rms_norm_linear_silu_mul.default, x, residual, weight, eps, proj_weight,
                            up_weight), 2)
