"""``fxp.attention``: causal attention over a paged-by-sequence KV cache that the op writes in place.

Serving engines flatten a batch into tokens: token ``t`` belongs to cache slot ``slot_ids[t]`` (one slot per
sequence) at position ``position_ids[t]``. The op first writes every token's key and value into its slot at its
position, then lets each token attend to its own slot's positions ``0..position_ids[t]``. Prefill (many tokens of
a sequence) and decode (one token per sequence) are the same call. The caches are declared mutated
(``Tensor(a!)``), which keeps the write alive through compilation; this is also the op piecewise CUDA graphs split
at.

A token whose slot id is negative (``PAD_SLOT``) is padding: it writes nothing and its output row is zero. That is
what lets a CUDA graph captured for N tokens run a batch of fewer: the runner marks the padded rows' slots. The
reference implementation below finds them with a boolean mask (a host sync, so it cannot be captured); the Triton
kernel (``ops.triton_attention``) skips them on the device, can be captured, and so is the one registered in
``ops.library.TOKEN_PADDING``.

Shapes: ``q [T, H, Dk]``, ``k [T, Hkv, Dk]``, ``v [T, Hkv, Dv]``, caches ``[slots, max_len, Hkv, D]``; returns
``[T, H, Dv]``. ``H`` must be a multiple of ``Hkv`` (grouped-query attention).

``fxp.attention.rope(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale, cos, sin, upcast)`` is the same call
on q and k before their rotary embedding: it computes ``rotary_embedding(q, cos, sin, upcast)`` and the same of k
(exactly that op's arithmetic; of the last ``cos.shape[-1]`` features of each head when the tables are narrower,
as DeepSeek's MLA rotates) and then attends, so its kernels can rotate while they load (the ``rope_attention``
pattern puts it in). It is an overload of ``fxp.attention``, so whatever names the op ``fxp.attention`` (the
piecewise CUDA-graph split) covers it too.
"""
from __future__ import annotations

import torch

from fxpasses.ops.elementwise import rotary_embedding_reference
from fxpasses.ops.library import LIB, check_float, check_same_device, define_op

PAD_SLOT = -1


def _check(q, k, v, k_cache, v_cache, slot_ids, position_ids):
    """Metadata checks only (dtype, device, shape): the eager, fake and CUDA kernels all run them, so they must
    not read tensor values. Positions and slots are values; ``_check_positions_on_cpu`` checks those."""
    check_float("attention", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    check_same_device("attention", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_ids=slot_ids,
                      position_ids=position_ids)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"fxp.attention: q, k, v must be [tokens, heads, head_dim], got {q.dim()}, {k.dim()}, {v.dim()} dims.")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fxp.attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads.")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"fxp.attention: q's head_dim {q.shape[2]} differs from k's {k.shape[2]}; they must be equal.")
    if (k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:] or v_cache.dim() != 4
            or v_cache.shape[2:] != v.shape[1:] or v_cache.shape[:2] != k_cache.shape[:2]):
        raise ValueError(
            f"fxp.attention: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit keys "
            f"{tuple(k.shape)} / values {tuple(v.shape)}; caches are [slots, max_len, kv_heads, head_dim], "
            "with the same slots and max_len for both."
        )
    if slot_ids.dtype != torch.int64 or position_ids.dtype != torch.int64:
        raise ValueError("fxp.attention: slot_ids and position_ids must be int64.")
    if slot_ids.dim() != 1 or position_ids.dim() != 1:
        raise ValueError(f"fxp.attention: slot_ids and position_ids must be 1-D [tokens], got {slot_ids.dim()} and "
                         f"{position_ids.dim()} dims.")
    # one slot and one position per token; as a torch._check this also tells the tracer the lengths are equal
    torch._check(slot_ids.shape[0] == q.shape[0], lambda: "fxp.attention: slot_ids must have one entry per token")
    torch._check(position_ids.shape[0] == q.shape[0],
                 lambda: "fxp.attention: position_ids must have one entry per token")
    # one torch._check each: ``a and b`` would force a bool out of a symbolic (possibly unbacked) comparison
    torch._check(k.shape[0] == q.shape[0], lambda: "fxp.attention: k must have one row per token, as q has")
    torch._check(v.shape[0] == q.shape[0], lambda: "fxp.attention: v must have one row per token, as q has")


def _check_positions_on_cpu(k_cache, slot_ids, position_ids):
    """Every real token's slot and position must lie inside the caches; padded tokens (negative slot) are free.

    Only on CPU, where the values are at hand. Reading them from a CUDA tensor would sync the device on every call
    and could not be captured in a CUDA graph, so nothing checks them there: the Triton kernel writes a position
    outside ``0..max_len-1`` into a neighbouring slot's rows (past the cache's ends for the first and last slot)
    and reads them back; the
    plain-torch implementation below, used on CUDA without Triton, hits CUDA's device-side index assert. Keeping
    positions below ``max_len`` on a GPU is the serving loop's job (it knows the cache it allocated).
    """
    slots, max_len = k_cache.shape[0], k_cache.shape[1]
    real = slot_ids >= 0
    bad = real & ((slot_ids >= slots) | (position_ids < 0) | (position_ids >= max_len))
    if not bool(bad.any()):
        return
    t = int(bad.nonzero()[0, 0])
    slot, pos = int(slot_ids[t]), int(position_ids[t])
    if slot >= slots:
        raise ValueError(f"fxp.attention: token {t} has slot_ids {slot} but the caches have {slots} slots "
                         f"(0..{slots - 1}); use a slot below {slots}, or caches with more slots.")
    if pos < 0:
        raise ValueError(f"fxp.attention: token {t} has position_ids {pos}; positions count from 0 (mark a padded "
                         f"token with a negative slot id, not a negative position).")
    raise ValueError(f"fxp.attention: token {t} has position_ids {pos} but the caches hold {max_len} positions per "
                     f"slot (0..{max_len - 1}); allocate caches with a larger max_len, or stop the sequence before "
                     "it outgrows them.")


def _attention(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale):
    _check(q, k, v, k_cache, v_cache, slot_ids, position_ids)
    if q.device.type == "cpu":
        _check_positions_on_cpu(k_cache, slot_ids, position_ids)
    real = slot_ids >= 0
    k_cache[slot_ids[real], position_ids[real]] = k[real].to(k_cache.dtype)
    v_cache[slot_ids[real], position_ids[real]] = v[real].to(v_cache.dtype)
    slots = slot_ids.clamp_min(0)  # padded rows read slot 0 and are zeroed below
    keys = k_cache[slots]  # [T, L, Hkv, Dk]
    values = v_cache[slots]
    groups = q.shape[1] // k.shape[1]
    keys = keys.repeat_interleave(groups, dim=2).float()
    values = values.repeat_interleave(groups, dim=2).float()
    scores = torch.einsum("thd,tlhd->thl", q.float(), keys) * scale
    visible = torch.arange(k_cache.shape[1], device=q.device)[None, :] <= position_ids[:, None]  # [T, L]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    out = torch.einsum("thl,tlhd->thd", torch.softmax(scores, dim=-1), values)
    return (out * real[:, None, None]).to(q.dtype)


def _attention_fake(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale):
    _check(q, k, v, k_cache, v_cache, slot_ids, position_ids)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


attention = define_op(
    "attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_ids,"
    " Tensor position_ids, float scale) -> Tensor",
    _attention,
    _attention_fake,
)


# ---- fxp.attention.rope: q/k rotary embedding folded into the attention op ------------------------------------
def _check_rope(q, k, v, k_cache, v_cache, slot_ids, position_ids, cos, sin, upcast):
    """``_check`` plus what the rotation needs; metadata only (the CUDA kernel runs it on every call)."""
    check_float("attention.rope", cos=cos, sin=sin)
    check_same_device("attention.rope", q=q, cos=cos, sin=sin)
    _check(q, k, v, k_cache, v_cache, slot_ids, position_ids)
    rot = cos.shape[-1] if cos.dim() else 0
    if rot % 2 or not 0 < rot <= q.shape[-1]:
        raise ValueError(
            f"fxp.attention.rope: cos and sin have {rot} features, but the rotation needs an even number of them, "
            f"at most the head_dim ({q.shape[-1]}): the last that many features of each q and k head are rotated.")
    for name, table in (("cos", cos), ("sin", sin)):
        for x_name, x in (("q", q), ("k", k)):
            part = x[..., x.shape[-1] - rot:]
            try:
                shape = torch.broadcast_shapes(part.shape, table.shape)
            except RuntimeError:
                shape = None
            if shape is None or tuple(shape) != tuple(part.shape):
                raise ValueError(
                    f"fxp.attention.rope: {name} {tuple(table.shape)} must broadcast to the rotated part of "
                    f"{x_name} {tuple(part.shape)} without enlarging it (one row per token, e.g. [tokens, 1, "
                    f"{rot}]).")
    if not upcast and (cos.dtype != q.dtype or sin.dtype != q.dtype or k.dtype != q.dtype):
        raise ValueError(
            f"fxp.attention.rope: without upcast the rotation is computed in the input dtype, so q ({q.dtype}), k "
            f"({k.dtype}), cos ({cos.dtype}) and sin ({sin.dtype}) must share one dtype; pass upcast=True (the "
            "rotation in float32) or cast the tables.")


def _rotate_last(x, cos, sin, upcast):
    """``rotary_embedding`` of the last ``cos.shape[-1]`` features of x, the others as they are (DeepSeek's MLA
    concatenates an unrotated part and a rotated part of each head)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return rotary_embedding_reference(x, cos, sin, upcast)
    keep, part = x.split([x.shape[-1] - rot, rot], dim=-1)
    return torch.cat((keep, rotary_embedding_reference(part, cos, sin, upcast)), dim=-1)


def rope_attention_reference(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale, cos, sin, upcast):
    """Exactly ``rotary_embedding(q)``, ``rotary_embedding(k)`` (same upcast and rounding as that op; of the last
    ``cos.shape[-1]`` features when the tables are narrower than a head), then ``attention``: the pattern that puts
    this op in never changes a number on the CPU."""
    _check_rope(q, k, v, k_cache, v_cache, slot_ids, position_ids, cos, sin, upcast)
    q = _rotate_last(q, cos, sin, upcast)
    k = _rotate_last(k, cos, sin, upcast)
    return _attention(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale)


def _rope_attention_fake(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale, cos, sin, upcast):
    _check_rope(q, k, v, k_cache, v_cache, slot_ids, position_ids, cos, sin, upcast)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


# An overload of fxp.attention rather than a new op name: the schema name stays ``fxp::attention``, so everything
# that names the op by ``namespace.name`` (``Backend(splitting_ops=("fxp.attention",))``, the default piecewise
# CUDA-graph split) treats both alike, while the default overload's schema, which patterns and tests use, is
# unchanged. The caches keep their names and order, so the auto_functionalized outputs line up with the default's.
LIB.define(
    "attention.rope(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_ids,"
    " Tensor position_ids, float scale, Tensor cos, Tensor sin, bool upcast) -> Tensor"
)
LIB.impl("attention.rope", rope_attention_reference, "CompositeExplicitAutograd")
torch.library.register_fake("fxp::attention.rope", _rope_attention_fake, lib=LIB)
rope_attention = torch.ops.fxp.attention.rope
