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
"""
from __future__ import annotations

import torch

from fxpasses.ops.library import check_float, define_op

PAD_SLOT = -1


def _check(q, k, v, k_cache, v_cache, slot_ids, position_ids):
    check_float("attention", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"fxp.attention: q, k, v must be [tokens, heads, head_dim], got {q.dim()}, {k.dim()}, {v.dim()} dims.")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fxp.attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads.")
    if k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:] or v_cache.shape[2:] != v.shape[1:]:
        raise ValueError(
            f"fxp.attention: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit keys "
            f"{tuple(k.shape)} / values {tuple(v.shape)}; caches are [slots, max_len, kv_heads, head_dim]."
        )
    if slot_ids.dtype != torch.int64 or position_ids.dtype != torch.int64:
        raise ValueError("fxp.attention: slot_ids and position_ids must be int64.")
    # one slot and one position per token; as a torch._check this also tells the tracer the lengths are equal
    torch._check(slot_ids.shape[0] == q.shape[0], lambda: "fxp.attention: slot_ids must have one entry per token")
    torch._check(position_ids.shape[0] == q.shape[0],
                 lambda: "fxp.attention: position_ids must have one entry per token")


def _attention(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale):
    _check(q, k, v, k_cache, v_cache, slot_ids, position_ids)
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
