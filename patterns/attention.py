"""The ``rope_attention`` pattern: q and k rotated by RoPE and then read by ``fxp.attention`` only ->
``fxp.attention.rope``, whose CUDA kernels rotate k while writing the cache and q while loading it (two RoPE
launches fewer per layer; at one token, one launch for the whole attention).

What it matches: an ``fxp.rotary_embedding`` (what the ``rotary_embedding`` pattern makes of every RoPE spelling it
knows, a round earlier) read only by the functionalized attention call (``auto_functionalized`` /
``auto_functionalized_v2`` of ``fxp.attention.default``) as its ``q`` or ``k``, where the other of the two is a
rotation too (the op, or a spelling the rotary pattern accepts) with the same ``cos`` and ``sin`` nodes and the same
float32-or-input-dtype rounding, read by nothing else. Whichever rotation comes later in the graph is the anchor.
Each operand may also be DeepSeek MLA's form: ``cat([unrotated, rotated], -1)`` per head, the rotated part maybe
one row ``expand``-ed over the heads (k_pe); the call then gets the same cat/expand of the unrotated parts (built
anew; the old ones go) and the op rotates the last ``cos.shape[-1]`` features of each head. Every node between a
rotation and the call must have that one reader, else a near miss names the other reader.

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
aten = torch.ops.aten


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
class Operand:
    """q or k as the attention call reads it: a rotation, maybe expanded over the heads (one rotated row shared by
    them, as MLA's k_pe), maybe after unrotated leading features (``cat([keep, rotated], -1)``, MLA's heads)."""

    read: torch.fx.Node  # the call's q or k argument
    rotation: Rotation
    expand: torch.fx.Node | None
    keep: torch.fx.Node | None

    @property
    def between(self) -> tuple[torch.fx.Node, ...]:
        """The nodes between the rotation and the call, which go with the fusion."""
        return tuple(n for n in (self.read, self.expand) if n is not None and n is not self.rotation.out)


@dataclass(frozen=True)
class Site:
    """One attention call whose q and k are both rotated (whole heads, or the last features of each head)."""

    call: torch.fx.Node  # auto_functionalized(_v2)(fxp.attention.default, ...)
    q: Operand
    k: Operand


def _is_attention_call(node: Any) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target in compat.auto_functionalized_ops() and bool(node.args)
            and node.args[0] is fxp.attention.default)


def holds_attention_call(graph: torch.fx.Graph) -> bool:
    """Whether the graph calls fxp.attention in the functional form ``rope_attention`` rewrites."""
    return any(_is_attention_call(node) for node in graph.nodes)


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


def _is(node: Any, target: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _last_dim(node: torch.fx.Node, dim: Any) -> bool:
    val = _val(node)
    return isinstance(dim, int) and isinstance(val, torch.Tensor) and dim in (-1, val.dim() - 1)


def _only_reader(node: torch.fx.Node, reader: torch.fx.Node, what: str) -> str | None:
    others = [u for u in node.users if u is not reader]
    return f"{what} ({node.name}) has another reader ({others[0].name}) besides the attention" if others else None


def operand_of(node: Any, name: str, call: torch.fx.Node) -> Operand | str:
    """The call's q or k (``name``) as a rotated operand, or why it is not one the op can fold."""
    if not isinstance(node, torch.fx.Node):
        return f"{name} of {call.name} is not computed in the graph"
    reason = _only_reader(node, call, f"the rotated {name}")
    if reason:
        return reason
    keep = expand = None
    inner = node
    if _is(node, aten.cat.default):
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(parts) != 2 or not _last_dim(node, dim):
            return f"{name} of {call.name} is a cat ({node.name}) of other than [unrotated, rotated] features per head"
        keep, inner = parts
    if _is(inner, aten.expand.default):
        reason = _only_reader(inner, node, f"the expanded rotation of {name}")
        expand, inner = inner, inner.args[0]
        if reason:
            return reason
    r = rotation_of(inner)
    if isinstance(r, str):
        return f"{name} of {call.name} is not rotated in a form the op folds: {r}"
    if inner is not node:
        reason = _only_reader(inner, expand or node, f"the rotation of {name}")
        if reason:
            return reason
    return Operand(node, r, expand, keep)


def _call_reading(rotated: torch.fx.Node) -> torch.fx.Node | None:
    """The attention call that reads ``rotated`` directly or through an expand and/or a cat (whether or not they
    have other readers: ``operand_of`` says so by name)."""
    frontier = [rotated]
    for _ in range(3):
        frontier = [u for n in frontier for u in n.users]
        calls = [u for u in frontier if _is_attention_call(u)]
        if calls:
            return calls[0]
        frontier = [u for u in frontier if _is(u, aten.expand.default) or _is(u, aten.cat.default)]
    return None


def site_of(rotated: torch.fx.Node) -> Site | str:
    """The attention call that reads ``rotated`` (a rotation output), with both operands, or why it cannot fuse."""
    call = _call_reading(rotated)
    if call is None:
        names = ", ".join(f"{u.name} ({u.target})" for u in rotated.users) or "nothing"
        return (f"the rotated tensor {rotated.name} is read by {names}, not by an fxp.attention call (directly, or "
                "expanded over heads and/or after unrotated features)")
    q_node, k_node = call.kwargs.get("q"), call.kwargs.get("k")
    if q_node is k_node:
        return f"{call.name} reads one tensor as both q and k"
    q = operand_of(q_node, "q", call)
    if isinstance(q, str):
        return q
    k = operand_of(k_node, "k", call)
    if isinstance(k, str):
        return k
    if rotated is not q.rotation.out and rotated is not k.rotation.out:
        return f"{rotated.name} reaches {call.name} but is neither the rotation of q nor of k"
    qr, kr = q.rotation, k.rotation
    if qr.x is kr.x:
        return f"q and k of {call.name} are rotations of one tensor ({qr.x.name})"
    if qr.cos is not kr.cos or qr.sin is not kr.sin:
        return (f"q is rotated with cos/sin ({qr.cos.name}, {qr.sin.name}) and k with ({kr.cos.name}, "
                f"{kr.sin.name}); the op takes one table pair")
    if qr.upcast != kr.upcast:
        return "q and k are rotated with different rounding (one in float32, one in the input dtype)"
    reason = _check_values(q, k)
    return reason or Site(call, q, k)


def _check_values(q: Operand, k: Operand) -> str | None:
    qv, kv, cos, sin = _val(q.read), _val(k.read), _val(q.rotation.cos), _val(q.rotation.sin)
    parts = [_val(o.rotation.x) for o in (q, k)]
    if any(not isinstance(t, torch.Tensor) for t in (qv, kv, cos, sin, *parts)):
        return "the inputs carry no shape metadata (meta['val']); run fake-tensor propagation first"
    if qv.dim() != 3 or kv.dim() != 3:
        return f"q {tuple(qv.shape)} and k {tuple(kv.shape)} are not [tokens, heads, head_dim]"
    rot = cos.shape[-1] if cos.dim() else 0
    for x_name, part in (("q", parts[0]), ("k", parts[1])):
        if part.dim() == 0 or part.shape[-1] != rot:
            return f"the rotated part of {x_name} has {part.shape[-1] if part.dim() else 0} features, cos has {rot}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in ops.SUPPORTED_FLOAT_DTYPES:
            return f"{name} is {t.dtype}, not a supported float dtype"
        for x_name, x in (("q", qv), ("k", kv)):
            part_shape = (*x.shape[:-1], rot)
            try:
                shape = torch.broadcast_shapes(part_shape, t.shape)
            except RuntimeError:
                return f"{name} {tuple(t.shape)} does not broadcast to the rotated part of {x_name} {part_shape}"
            if tuple(shape) != tuple(part_shape):
                return f"{name} {tuple(t.shape)} enlarges the rotated part of {x_name} {part_shape} when broadcast"
    dtypes = {qv.dtype, kv.dtype, cos.dtype, sin.dtype}
    if not q.rotation.upcast and len(dtypes) > 1:
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
        for read in (call.kwargs.get("q"), call.kwargs.get("k")):
            operand = operand_of(read, "q", call)
            site = site_of(operand.rotation.out) if isinstance(operand, Operand) else None
            if isinstance(site, Site) and any(r.x is bindings["x"] and r.cos is bindings["cos"]
                                              and r.sin is bindings["sin"] for r in (site.q.rotation, site.k.rotation)):
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
    """A fused rotation that reaches an attention call (directly, or through an expand and/or a cat): where a
    failed match is worth explaining."""
    return _is(node, fxp.rotary_embedding.default) and _call_reading(node) is not None


def _why_not(node: torch.fx.Node) -> str | None:
    """For a fused rotation that stayed outside its attention call: the reason (a one-node match is too short for
    the driver to record the check's reason as an attempt)."""
    site = site_of(node)
    return site if isinstance(site, str) else None


@pattern(
    name="rope_attention",
    needs=holds_attention_call,
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
    with b.graph.inserting_before(call):
        kwargs = dict(call.kwargs)
        kwargs.update(q=_unrotated(b, site.q), k=_unrotated(b, site.k), cos=cos, sin=sin, upcast=site.q.rotation.upcast)
        new = b.graph.call_function(call.target, (fxp.attention.rope,), kwargs)
    new.meta.update(call.meta)  # same outputs: the op's result and the two caches' new values
    b.created.append(new)
    call.replace_all_uses_with(new)
    b.graph.erase_node(call)
    anchor = site.k if site.k.rotation.x is x else site.q
    other = site.q if anchor is site.k else site.k
    # what lay between the rotations and the call, and the other rotation; the driver erases the anchor's own node
    gone = [*site.q.between, *site.k.between, *other.rotation.nodes]
    for node in sorted(set(gone), key=_order(b.graph), reverse=True):
        if not node.users:
            b.graph.erase_node(node)
    return x  # stands in for the anchor's rotation, which nothing reads any more


def _unrotated(b, operand: Operand) -> torch.fx.Node:
    """The operand as it was before its rotation: the input itself, or rebuilt the way the rotated one was built
    (expanded over the heads, then after the unrotated features) from the unrotated input."""
    node = operand.rotation.x
    if operand.expand is not None:
        shape = _val(operand.expand).shape
        node = _insert(b, aten.expand.default, (node, operand.expand.args[1]), operand.expand,
                       lambda x: x.expand(shape), node)
    if operand.keep is not None:
        keep = _val(operand.keep)
        node = _insert(b, aten.cat.default, ([operand.keep, node], -1), operand.read,
                       lambda x: torch.cat([keep, x], -1), node)
    return node


def _insert(b, target: Any, args: tuple, like: torch.fx.Node, fake: Any, source: torch.fx.Node) -> torch.fx.Node:
    """A new node (at the graph's insertion point) with ``like``'s source metadata and a fake value computed
    from ``source``'s."""
    new = b.graph.call_function(target, args)
    new.meta.update({k: like.meta[k] for k in ("stack_trace", "nn_module_stack") if k in like.meta})
    val = _val(source)
    mode = compat.detect_fake_mode([val])
    if mode is not None:
        with mode:
            new.meta["val"] = fake(val)
    b.created.append(new)
    return new


def _order(graph: torch.fx.Graph):
    position = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: position.get(n, -1)
