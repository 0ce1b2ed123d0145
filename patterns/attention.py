"""The ``rope_attention`` pattern: q and k rotated by RoPE and then read by ``fxp.attention`` only ->
``fxp.attention.rope``, whose CUDA kernels rotate k while writing the cache and q while loading it (two RoPE
launches fewer per layer; at one token, one launch for the whole attention).

What it matches: an ``fxp.rotary_embedding`` (what the ``rotary_embedding`` pattern makes of every RoPE spelling it
knows, a round earlier) whose one reader is the functionalized attention call (``auto_functionalized`` /
``auto_functionalized_v2`` of ``fxp.attention.default``) as its ``q`` or ``k``, where the other of the two is a
rotation too (the op, or a spelling the rotary pattern accepts) with the same ``cos`` and ``sin`` nodes and the same
float32-or-input-dtype rounding, read by nothing else. Whichever rotation comes later in the graph is the anchor.

Why it anchors at the fused op and not at a spelled chain: the rotary pattern's near misses (a chain that is not
a rotation after all) stay that pattern's to explain, and a graph keeps one path: spelling -> rotary op ->
attention op. With ``Backend(patterns=...)`` naming this pattern, name ``rotary_embedding`` too.

Why it is anchored at a rotation and not at the attention call: the matcher walks the operands of ATen-style ops,
and a higher-order op's keyword arguments (every operand of ``auto_functionalized``) are not operands it sees, so a
spelling cannot contain the attention call. The check therefore finds the one attention call reading the anchor,
and the replacement rewrites that call: the new call takes the unrotated q and k plus ``cos``, ``sin`` and the
rounding flag, keeps every other keyword (the caches, their view encoding) and the same outputs (the op's caches
have the same names and order), and both rotations go. The replacement returns the unrotated k for the anchor's
uses, of which none is left by then.

Numbers: on the CPU the op computes ``rotary_embedding`` twice and then ``attention``, the same functions in the same
order, so the graph's results are bit for bit what they were. On CUDA the rotation happens inside the attention
kernels (the same float32 products and roundings; the cache rows come out identical under Triton's interpreter).
Not on the Inductor path, like the rotary pattern (Inductor fuses the rotation itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpasses import compat, ops
from fxpasses.patterns.elementwise import _rotary_inputs, check_rotary
from fxpasses.patterns.matcher import Match, MatchFailure, match
from fxpasses.patterns.registry import MatchContext, pattern, traced_variants

fxp = torch.ops.fxp


@dataclass(frozen=True)
class Rotation:
    """A rotation feeding attention: its output node, the unrotated input, the tables, the rounding, its nodes."""

    out: torch.fx.Node
    x: torch.fx.Node
    cos: torch.fx.Node
    sin: torch.fx.Node
    upcast: bool
    nodes: tuple[torch.fx.Node, ...]


@dataclass(frozen=True)
class Site:
    """One attention call whose q and k are both rotations."""

    call: torch.fx.Node  # auto_functionalized(_v2)(fxp.attention.default, ...)
    q: Rotation
    k: Rotation


def _is_attention_call(node: Any) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target in compat.auto_functionalized_ops() and bool(node.args)
            and node.args[0] is fxp.attention.default)


def rotation_of(node: Any) -> Rotation | str:
    """``node`` as a rotation (fused op or a spelled chain the rotary pattern accepts), or why it is not one."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return f"{getattr(node, 'name', node)} is not computed in the graph"
    if node.target is fxp.rotary_embedding.default:
        x, cos, sin, upcast = (list(node.args) + [node.kwargs.get(k) for k in ("x", "cos", "sin", "upcast")][len(node.args):])
        if not all(isinstance(t, torch.fx.Node) for t in (x, cos, sin)):
            return f"{node.name} rotates constants"
        return Rotation(node, x, cos, sin, bool(upcast), (node,))
    best: MatchFailure | None = None
    for variant in traced_variants("rotary_embedding"):
        if variant.anchor.target != node.target:
            continue
        try:
            m = match(variant, node)
        except MatchFailure as failure:
            best = failure if best is None or failure.reached > best.reached else best
            continue
        reason = check_rotary(m, MatchContext())
        if reason:
            return f"the rotation {node.name} cannot be folded: {reason}"
        b = m.bindings
        return Rotation(node, b["x"], b["cos"], b["sin"], "dtype" in b, tuple(m.graph_nodes))
    return f"{node.name} is not a rotation ({best.reason})" if best is not None else f"{node.name} is not a rotation"


def _val(node: torch.fx.Node) -> Any:
    return node.meta.get("val")


def site_of(rotated: torch.fx.Node) -> Site | str:
    """The attention call that reads ``rotated`` (a rotation output), with both rotations, or why it cannot fuse."""
    readers = list(rotated.users)
    call = readers[0] if len(readers) == 1 else None
    if not _is_attention_call(call):
        names = ", ".join(f"{u.name} ({u.target})" for u in readers) or "nothing"
        return f"the rotated tensor {rotated.name} is read by {names}, not by one fxp.attention call alone"
    q_node, k_node = call.kwargs.get("q"), call.kwargs.get("k")
    if rotated is not q_node and rotated is not k_node:
        return f"{rotated.name} reaches {call.name} as neither q nor k"
    if q_node is k_node:
        return f"{call.name} reads one tensor as both q and k"
    rotations = {}
    for name, node in (("q", q_node), ("k", k_node)):
        r = rotation_of(node)
        if isinstance(r, str):
            return f"{name} of {call.name} is not rotated in a form the op folds: {r}"
        others = [u for u in node.users if u is not call]
        if others:
            return f"the rotated {name} ({node.name}) has another reader ({others[0].name}) besides the attention"
        rotations[name] = r
    q, k = rotations["q"], rotations["k"]
    if q.x is k.x:
        return f"q and k of {call.name} are rotations of one tensor ({q.x.name})"
    if q.cos is not k.cos or q.sin is not k.sin:
        return (f"q is rotated with cos/sin ({q.cos.name}, {q.sin.name}) and k with ({k.cos.name}, {k.sin.name}); "
                "the op takes one table pair")
    if q.upcast != k.upcast:
        return "q and k are rotated with different rounding (one in float32, one in the input dtype)"
    reason = _check_values(q, k, call)
    return reason or Site(call, q, k)


def _check_values(q: Rotation, k: Rotation, call: torch.fx.Node) -> str | None:
    qv, kv, cos, sin = _val(q.x), _val(k.x), _val(q.cos), _val(q.sin)
    if any(not isinstance(t, torch.Tensor) for t in (qv, kv, cos, sin)):
        return "the inputs carry no shape metadata (meta['val']); run fake-tensor propagation first"
    if qv.dim() != 3 or kv.dim() != 3:
        return f"q {tuple(qv.shape)} and k {tuple(kv.shape)} are not [tokens, heads, head_dim]"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in ops.SUPPORTED_FLOAT_DTYPES:
            return f"{name} is {t.dtype}, not a supported float dtype"
        for x_name, x in (("q", qv), ("k", kv)):
            try:
                shape = torch.broadcast_shapes(x.shape, t.shape)
            except RuntimeError:
                return f"{name} {tuple(t.shape)} does not broadcast to {x_name} {tuple(x.shape)}"
            if tuple(shape) != tuple(x.shape):
                return f"{name} {tuple(t.shape)} enlarges {x_name} {tuple(x.shape)} when broadcast"
    if not q.upcast and len({qv.dtype, kv.dtype, cos.dtype, sin.dtype}) > 1:
        return (f"the rotation is in the input dtype with mixed dtypes (q {qv.dtype}, k {kv.dtype}, cos {cos.dtype}, "
                f"sin {sin.dtype}): the op rotates in one dtype")
    return None


def check_rope_attention(m: Match, ctx: MatchContext) -> str | None:
    site = site_of(m.anchor)
    if isinstance(site, str):
        return site
    if len(_sites_of(m.anchor.graph, m.bindings)) != 1:
        return f"the rotation's input {m.bindings['x'].name} is rotated for more than one attention call"
    return None


def _sites_of(graph: torch.fx.Graph, bindings: dict[str, Any]) -> list[Site]:
    """The fusable attention calls whose q or k is a rotation of ``bindings``' x with its cos and sin: found by
    walking a few steps down from x (a rotation chain is under ten nodes), not by scanning the graph."""
    calls, seen, frontier = [], set(), [bindings["x"]]
    for _ in range(12):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
        calls += [u for u in frontier if _is_attention_call(u)]
    out = []
    for call in dict.fromkeys(calls):
        for rotated in (call.kwargs.get("q"), call.kwargs.get("k")):
            site = site_of(rotated) if isinstance(rotated, torch.fx.Node) else None
            if isinstance(site, Site) and any(r.x is bindings["x"] and r.cos is bindings["cos"]
                                              and r.sin is bindings["sin"] for r in (site.q, site.k)):
                out.append(site)
                break
    return out


def eager_only(mapping: Any, config: Any) -> bool:
    return config is None or getattr(config, "defunctionalize", True)


def _fused(upcast: bool):
    def spelling(x, cos, sin):
        return torch.ops.fxp.rotary_embedding(x, cos, sin, upcast)

    return spelling


def _feeds_attention(node: torch.fx.Node) -> bool:
    """A fused rotation read by an attention call: where a failed match is worth explaining."""
    return (node.op == "call_function" and node.target is fxp.rotary_embedding.default
            and any(_is_attention_call(u) for u in node.users))


def _why_not(node: torch.fx.Node) -> str | None:
    """For a fused rotation that stayed outside its attention call: the reason (a one-node match is too short for
    the driver to record the check's reason as an attempt)."""
    site = site_of(node)
    return site if isinstance(site, str) else None


@pattern(
    name="rope_attention",
    benefit=12,  # the only pattern anchored at fxp.rotary_embedding: orders nothing today
    spellings=lambda: [_fused(True), _fused(False)],
    input_names=("x", "cos", "sin"),
    example_inputs=_rotary_inputs,
    checks=(check_rope_attention,),
    applies=eager_only,
    applies_doc="not on the Inductor path (Inductor fuses the rotation itself)",
    explain_when_off=False,
    hint=_feeds_attention,
    explain=_why_not,
)
def rope_attention(b, x, cos, sin, **bindings):
    """rotary(q), rotary(k) read only by fxp.attention -> fxp.attention.rope(q, k, ..., cos, sin, upcast)"""
    (site,) = _sites_of(b.graph, {"x": x, "cos": cos, "sin": sin})  # the check made sure there is one
    call = site.call
    kwargs = dict(call.kwargs)
    kwargs.update(q=site.q.x, k=site.k.x, cos=cos, sin=sin, upcast=site.q.upcast)
    with b.graph.inserting_before(call):
        new = b.graph.call_function(call.target, (fxp.attention.rope,), kwargs)
    new.meta.update(call.meta)  # same outputs: the op's result and the two caches' new values
    b.created.append(new)
    call.replace_all_uses_with(new)
    b.graph.erase_node(call)
    anchor = site.k if site.k.x is x else site.q
    other = site.q if anchor is site.k else site.k
    for node in sorted(other.nodes, key=_order(b.graph), reverse=True):  # the other rotation; the driver
        if not node.users:  # erases the anchor's own nodes
            b.graph.erase_node(node)
    return x  # stands in for the anchor's rotation, which nothing reads any more


def _order(graph: torch.fx.Graph):
    position = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: position.get(n, -1)
