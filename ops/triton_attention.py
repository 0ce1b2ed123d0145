"""Triton kernels for ``fxp.attention`` and ``fxp.attention.rope`` on CUDA tensors: a launch that writes the new
keys and values into the cache, and a launch that computes every token's attention over its slot with an online
softmax; for batches of up to ``MAX_FUSED_TOKENS`` tokens (decode), the attention launch alone, writing the cache
itself.

Why the attention launch can write the cache itself (batches of up to ``MAX_FUSED_TOKENS`` tokens, decided from
the shape, so the choice costs no host sync and a captured size always runs the same way): program (t, h) is the
only writer of token t's row of kv head h, writes it, waits at a block barrier (which makes the block's global
stores visible to all its threads) and reads it back with the rest of the slot. Rows that other tokens of the batch
write into the same slot (a prefill chunk) are the only ones it could read before they land, since programs of one
launch are not ordered: it finds them by comparing its slot and position with every token's, leaves them out of
the cache walk and takes their keys and values from the inputs (rotated and rounded as the cache stores them). A
decode batch (every token its own sequence) finds none. That saves one launch per layer (about 1.2 us measured on
an H200 at one token). Larger batches (prefill) write the cache in a launch of their own first.

Each attention program handles one token and one key/value head, i.e. the group of query heads that share it
(grouped-query attention), so the cache rows are read once per group; it walks positions ``0..position_ids[t]`` in
blocks of ``BLOCK_N``. Padded tokens (negative slot, ``ops.attention.PAD_SLOT``) write nothing and get zeros, on
the device: no host sync, so the op can be captured in a CUDA graph with padding.

RoPE (``ROPE``): the cache write rotates each key row as it stores it and the attention launch rotates the query
rows as it loads them (``_rotated_row``: the row read twice, once in rotate-half order), with the products and sums
rounded where ``fxp.rotary_embedding`` rounds them, so the cache holds what the unfused ops would have written (bit
for bit without ``upcast``; with it, a float32 sum the GPU may form with an fma, as the rotary kernel does). The
two RoPE launches per layer go.

Precision follows the reference: scores and the softmax in float32; the probabilities are rounded to the cache
dtype for the second product in bf16/fp16 (as FlashAttention does), and every product is IEEE float32 for float32
caches (no TF32).

Long contexts: one program per (token, kv head) would leave most SMs idle for a small decode batch (Llama-1B at
one token: 8 programs on 132 SMs). Such launches split each token's context over several programs
(``plan_splits``, flash-decoding): each folds its chunk of positions into its own running max, sum and weighted
values, writes them to a float32 workspace and takes a ticket from an arrival counter per (token, kv head); the
last to arrive merges the splits in split order and stores the output, then zeroes the counter
(``ops/arrival_counters.py``, shared with split-K). Deterministic run to run; not bit-identical to
the unsplit walk (the merge rescales partial sums in another order), within the same tolerance of the reference.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fxpasses.ops.attention import PAD_SLOT, _check, _check_rope, _rotate_last
from fxpasses.ops.library import LIB, TOKEN_PADDING
from fxpasses.ops import arrival_counters
from fxpasses.ops.triton_rounding import round_as


@triton.jit
def _rotated_row(X, COS, SIN, d, valid, DK, HALF, UPCAST: tl.constexpr):
    """A row of ``X`` at columns ``d`` rotated as ``fxp.rotary_embedding`` rotates it, rounded to X's dtype.

    The last ``2 * HALF`` columns are rotated (all of them but for MLA's unrotated leading part), the others kept.
    Rotated column ``d`` pairs with ``d + HALF`` (first half, negated) or ``d - HALF`` (second half), so the row is
    loaded twice in a permuted order instead of split: ``x * cos + rotate_half(x) * sin`` element by element, with
    the products and the sum rounded where the op rounds them. ``valid``: which rows exist (broadcast with ``d``)."""
    e = d - (DK - 2 * HALF)  # the column inside the rotated part; negative: not rotated
    rot = e >= 0
    first = e < HALF
    partner = tl.where(first, d + HALF, d - HALF)
    x = tl.load(X + d, mask=(d < DK) & valid, other=0.0)
    xp = tl.load(X + partner, mask=(d < DK) & valid & rot, other=0.0)
    c = tl.load(COS + e, mask=(d < DK) & valid & rot, other=0.0)
    s = tl.load(SIN + e, mask=(d < DK) & valid & rot, other=0.0)
    xp = tl.where(first, -xp, xp)
    if UPCAST:  # float32 throughout, one rounding at the end
        r = x.to(tl.float32) * c.to(tl.float32) + xp.to(tl.float32) * s.to(tl.float32)
    else:  # the input dtype: each product rounded to it, then the sum (rounded below)
        dt = X.dtype.element_ty
        r = round_as(x.to(tl.float32) * c.to(tl.float32), dt) + round_as(xp.to(tl.float32) * s.to(tl.float32), dt)
    return tl.where(rot, r.to(X.dtype.element_ty), x)


@triton.jit
def _write_kv(K, V, KC, VC, COS, SIN, t, h, slot, pos, skt, skh, svt, svh, sct, sst, skc_s, skc_l, skc_h, svc_s,
              svc_l, svc_h, DK, DV, HALF, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, ROPE: tl.constexpr,
              UPCAST: tl.constexpr):
    """Token ``t``'s key and value of kv head ``h`` into the caches at (slot, pos); nothing for a padded token.
    With ROPE the key is rotated first (cos/sin rows of the token)."""
    real = slot >= 0
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    if ROPE:
        k = _rotated_row(K + t * skt + h * skh, COS + t * sct, SIN + t * sst, dk, dk < DK, DK, HALF,
                         UPCAST)
    else:
        k = tl.load(K + t * skt + h * skh + dk, mask=dk < DK)
    tl.store(KC + slot * skc_s + pos * skc_l + h * skc_h + dk, k.to(KC.dtype.element_ty), mask=(dk < DK) & real)
    v = tl.load(V + t * svt + h * svh + dv, mask=dv < DV)
    tl.store(VC + slot * svc_s + pos * svc_l + h * svc_h + dv, v.to(VC.dtype.element_ty), mask=(dv < DV) & real)


@triton.jit
def _cache_write_kernel(K, V, KC, VC, SLOT, POS, COS, SIN, skt, skh, svt, svh, sct, sst, skc_s, skc_l, skc_h, svc_s,
                        svc_l, svc_h, DK, DV, HALF, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                        ROPE: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    _write_kv(K, V, KC, VC, COS, SIN, t, h, tl.load(SLOT + t), tl.load(POS + t), skt, skh, svt, svh, sct, sst,
              skc_s, skc_l, skc_h, svc_s, svc_l, svc_h, DK, DV, HALF, BLOCK_DK, BLOCK_DV, ROPE, UPCAST)


@triton.jit
def _online_softmax_step(q, k, v, visible, m, denom, acc, scale, IEEE: tl.constexpr):
    """One block of keys ``k`` and values ``v`` (rows where ``visible``) folded into the running max ``m``, sum
    ``denom`` and weighted values ``acc`` of each query head (the flash-attention recurrence)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing visible yet adds nothing
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    denom = denom * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, denom, acc


@triton.jit
def _attention_kernel(Q, KC, VC, SLOT, POS, OUT, K, V, COS, SIN, WS, WSM, CNT, scale, sqt, sqh, skc_s, skc_l, skc_h,
                      svc_s, svc_l, svc_h, sot, soh, skt, skh, svt, svh, sct, sst, GROUP, DK, DV, HALF, T, CHUNK,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                      BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, IEEE: tl.constexpr,
                      ROPE: tl.constexpr, UPCAST: tl.constexpr, WRITE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    slot = tl.load(SLOT + t)
    pos = tl.load(POS + t)
    n_keys = tl.where(slot >= 0, pos + 1, 0)  # padded tokens read nothing
    # Splits over the context (flash-decoding): program ``split`` walks positions [split * CHUNK, +CHUNK); only
    # the first ``used`` splits hold any of this token's keys, the others have nothing to do. The last used split
    # is the one whose chunk holds ``pos``: it writes the token's row (WRITE) and folds in the batch's own rows.
    # With one used split (a short context) split 0 walks all of it.
    used = (n_keys + CHUNK - 1) // CHUNK
    used = tl.where(used < MIN_USED_SPLITS, 1, used)  # a short context: one program walks it, no merge
    if split < used:
        _attention_split(Q, KC, VC, OUT, K, V, COS, SIN, WS, WSM, CNT, scale, sqt, sqh, skc_s, skc_l, skc_h, svc_s,
                         svc_l, svc_h, sot, soh, skt, skh, svt, svh, sct, sst, GROUP, DK, DV, HALF, T, CHUNK, t, h,
                         split, used, slot, pos, n_keys, SLOT, POS, BLOCK_G, BLOCK_N, BLOCK_DK, BLOCK_DV, BLOCK_T,
                         SPLITS, SPLITS_P2, IEEE, ROPE, UPCAST, WRITE)


@triton.jit
def _attention_split(Q, KC, VC, OUT, K, V, COS, SIN, WS, WSM, CNT, scale, sqt, sqh, skc_s, skc_l, skc_h, svc_s, svc_l,
                     svc_h, sot, soh, skt, skh, svt, svh, sct, sst, GROUP, DK, DV, HALF, T, CHUNK, t, h, split, used,
                     slot, pos, n_keys, SLOT, POS, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
                     SPLITS_P2: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr,
                     WRITE: tl.constexpr):
    last = split == used - 1
    g = tl.arange(0, BLOCK_G)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    if WRITE:
        # One launch (a batch of at most BLOCK_T tokens): this program writes its token's key and value of its kv
        # head, then reads them back with the rest of the slot; the barrier makes the block's global stores visible
        # to all of its threads. Rows that *other* tokens of this batch write into this slot (a prefill chunk) may
        # not have landed yet: they are masked out of the cache walk and taken from the k and v inputs instead.
        # Split over the context, only the last used split holds ``pos``: it alone writes and reads the row back.
        if last:
            _write_kv(K, V, KC, VC, COS, SIN, t, h, slot, pos, skt, skh, svt, svh, sct, sst, skc_s, skc_l, skc_h,
                      svc_s, svc_l, svc_h, DK, DV, HALF, BLOCK_DK, BLOCK_DV, ROPE, UPCAST)
        tl.debug_barrier()
        tt = tl.arange(0, BLOCK_T)
        b_slot = tl.load(SLOT + tt, mask=tt < T, other=-1)
        b_pos = tl.load(POS + tt, mask=tt < T, other=0)
        shared = (b_slot == slot) & (slot >= 0) & (tt != t) & (b_pos <= pos)  # batch rows this token reads
        conflict = tl.sum(shared.to(tl.int32), axis=0) > 0
    slot = tl.maximum(slot, 0)
    heads = h * GROUP + g
    if ROPE:
        q = _rotated_row(Q + t * sqt + heads[:, None] * sqh, COS + t * sct, SIN + t * sst, dk[None, :],
                         g[:, None] < GROUP, DK, HALF, UPCAST).to(KC.dtype.element_ty)
    else:
        q = tl.load(Q + t * sqt + heads[:, None] * sqh + dk[None, :],
                    mask=(g[:, None] < GROUP) & (dk[None, :] < DK), other=0.0).to(KC.dtype.element_ty)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    start = split * CHUNK
    end = tl.where(used == 1, n_keys, tl.minimum(start + CHUNK, n_keys))
    while start < end:  # a while loop (not range) so Triton's CPU interpreter runs it too
        n = start + tl.arange(0, BLOCK_N)
        visible = n < end
        if WRITE:
            if conflict:
                written = tl.max((shared[None, :] & (b_pos[None, :] == n[:, None])).to(tl.int32), axis=1) > 0
                visible = visible & (written == 0)
        k = tl.load(KC + slot * skc_s + n[:, None] * skc_l + h * skc_h + dk[None, :],
                    mask=visible[:, None] & (dk[None, :] < DK), other=0.0)
        v = tl.load(VC + slot * svc_s + n[:, None] * svc_l + h * svc_h + dv[None, :],
                    mask=visible[:, None] & (dv[None, :] < DV), other=0.0)
        m, denom, acc = _online_softmax_step(q, k, v, visible, m, denom, acc, scale, IEEE)
        start += BLOCK_N
    if WRITE:
        if conflict and last:  # the batch's own rows of this slot, from the inputs, rounded as the cache stores them
            if ROPE:
                kb = _rotated_row(K + tt[:, None] * skt + h * skh, COS + tt[:, None] * sct, SIN + tt[:, None] * sst,
                                  dk[None, :], shared[:, None], DK, HALF, UPCAST)
            else:
                kb = tl.load(K + tt[:, None] * skt + h * skh + dk[None, :],
                             mask=shared[:, None] & (dk[None, :] < DK), other=0.0)
            vb = tl.load(V + tt[:, None] * svt + h * svh + dv[None, :], mask=shared[:, None] & (dv[None, :] < DV),
                         other=0.0)
            m, denom, acc = _online_softmax_step(q, kb.to(KC.dtype.element_ty), vb.to(VC.dtype.element_ty), shared,
                                                 m, denom, acc, scale, IEEE)
    if SPLITS == 1:  # (a constexpr: an unsplit launch compiles no merge)
        _store_attention(OUT, t, sot, soh, heads, g, dv, GROUP, DV, acc, denom)
    elif used == 1:
        _store_attention(OUT, t, sot, soh, heads, g, dv, GROUP, DV, acc, denom)
    else:  # this split's running max, sum and weighted values to the workspace; the last to arrive merges every
        # used split's in split order 0..used-1 (so the result does not depend on which program finished last: the
        # same bits every run), as split-K does in ops/triton_linear.py
        part = (t * tl.num_programs(1) + h) * SPLITS
        tl.store(WS + ((part + split) * BLOCK_G + g[:, None]) * BLOCK_DV + dv[None, :], acc)
        tl.store(WSM + (part + split) * 2 * BLOCK_G + g, m)
        tl.store(WSM + ((part + split) * 2 + 1) * BLOCK_G + g, denom)
        tl.debug_barrier()  # every thread's partial stores, then one release at GPU scope
        counter = CNT + t * tl.num_programs(1) + h
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == used - 1:
            # Every split's max at once, then each split's weighted values scaled to the common max: the loads
            # are independent (unrolled, masked past ``used``), so they are in flight together, not one L2
            # round trip after another.
            sidx = tl.arange(0, SPLITS_P2)
            live = sidx < used
            m_all = tl.load(WSM + (part + sidx)[:, None] * 2 * BLOCK_G + g[None, :], mask=live[:, None],
                            other=float("-inf"), cache_modifier=".cg")
            d_all = tl.load(WSM + ((part + sidx) * 2 + 1)[:, None] * BLOCK_G + g[None, :], mask=live[:, None],
                            other=0.0, cache_modifier=".cg")
            m = tl.max(m_all, axis=0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)  # nothing visible in any split
            denom = tl.sum(d_all * tl.exp(m_all - m_safe[None, :]), axis=0)
            acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
            for i in tl.static_range(SPLITS):  # in split order: the same bits whichever program came last
                m_i = tl.load(WSM + (part + i) * 2 * BLOCK_G + g, mask=(g >= 0) & (i < used),
                              other=float("-inf"), cache_modifier=".cg")
                a_i = tl.load(WS + ((part + i) * BLOCK_G + g[:, None]) * BLOCK_DV + dv[None, :],
                              mask=(g[:, None] >= 0) & (i < used), other=0.0, cache_modifier=".cg")
                acc += a_i * tl.exp(m_i - m_safe)[:, None]
            _store_attention(OUT, t, sot, soh, heads, g, dv, GROUP, DV, acc, denom)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zeroed for the next launch / replay


@triton.jit
def _store_attention(OUT, t, sot, soh, heads, g, dv, GROUP, DV, acc, denom):
    out = tl.where(denom[:, None] > 0, acc / tl.maximum(denom, 1e-30)[:, None], 0.0)
    tl.store(OUT + t * sot + heads[:, None] * soh + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=(g[:, None] < GROUP) & (dv[None, :] < DV))


# Batches up to this many tokens run one launch (the attention program writes its own row); larger ones (prefill)
# keep the cache-write launch. Each program of a one-launch batch compares its slot with every token's.
MAX_FUSED_TOKENS = 64
# Splits over the context: a launch of fewer (token, kv head) programs than the GPU has SMs cuts each program's
# positions into chunks of at least MIN_CHUNK, up to SPLIT_WAVES programs per SM in all (measured, H200: a launch
# that fills the SMs already lost by splitting at 8B's head size, 0.84-0.91x, and 4 per SM beat 2 and 8 at 1B).
# The split count comes from the cache's length (a shape), never from the positions (values): no host sync, and a
# captured size always runs the same way; chunks past a token's position return at once.
MIN_CHUNK = 64
# A token whose context fills fewer chunks than this is walked by one program (the others return at once): measured
# on an H200, 256 positions in two chunks of 160 merged ran 7% slower than one walk (1B, one token), while 1024 in
# 17 chunks ran 3.6x faster. Decided per token on the device, from its position.
MIN_USED_SPLITS = tl.constexpr(4)
SPLIT_WAVES = 4  # programs per SM a split launch aims at (benchmarks/attention.py --waves)
MAX_SPLITS = 32  # the merge unrolls one load per split


@dataclass(frozen=True)
class SplitPlan:
    """How a launch cuts the context: ``splits`` programs per (token, kv head), ``chunk`` positions each."""

    splits: int
    chunk: int


def plan_splits(programs: int, cache_len: int, block_n: int, sms: int) -> SplitPlan:
    """The split of the context for a launch of ``programs`` (token, kv head) programs on a GPU of ``sms`` SMs."""
    whole = SplitPlan(1, max(cache_len, 1))
    if os.environ.get("FXPASSES_ATTENTION_SPLIT", "1") == "0" or cache_len <= MIN_CHUNK or programs >= sms:
        return whole
    splits = min(triton.cdiv(cache_len, MIN_CHUNK), SPLIT_WAVES * sms // max(programs, 1), MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(cache_len, splits), block_n) * block_n
    splits = triton.cdiv(cache_len, chunk)
    return whole if splits < 2 else SplitPlan(splits, chunk)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale, rope: tuple | None, fuse_write: bool,
            split: SplitPlan | None = None):
    """Both launches (cache write, then attention), or the attention launch alone writing the cache itself.

    ``rope``: None, or ``(cos_rows, sin_rows, upcast)`` with one [tokens, head_dim] row per token.
    ``fuse_write`` is decided from the shape alone (at most ``MAX_FUSED_TOKENS`` tokens), never from values: no
    host sync, so the launch can be captured in a CUDA graph, and a captured size always runs the same way.
    ``split``: the context split (``plan_splits`` for this GPU when None)."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("fxp.attention: the caches' last dimension must be contiguous (they are written in place).")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    slot_ids, position_ids = slot_ids.contiguous(), position_ids.contiguous()
    tokens, heads, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[2]
    out = q.new_empty(tokens, heads, dv)
    if tokens == 0:
        return out
    cos, sin, upcast = rope if rope is not None else (q, q, False)  # unread without ROPE
    sct, sst = (cos.stride(0), sin.stride(0)) if rope is not None else (0, 0)
    half = cos.shape[-1] // 2 if rope is not None else 0  # the last 2 * half features of q and k are rotated
    block_dk, block_dv = max(triton.next_power_of_2(dk), 16), max(triton.next_power_of_2(dv), 16)
    common = dict(BLOCK_DK=block_dk, BLOCK_DV=block_dv, ROPE=rope is not None, UPCAST=bool(upcast))
    if not fuse_write:
        _cache_write_kernel[(tokens, kv_heads)](
            k, v, k_cache, v_cache, slot_ids, position_ids, cos, sin, k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), sct, sst, *k_cache.stride()[:3], *v_cache.stride()[:3], dk, dv, half, num_warps=1,
            **common,
        )
    group = heads // kv_heads
    block_n = 32 if max(block_dk, block_dv) <= 128 else 16
    block_g = max(triton.next_power_of_2(group), 16)
    if split is None:
        split = plan_splits(tokens * kv_heads, k_cache.shape[1], block_n, _sm_count(q.device))
    counters = (arrival_counters.take(q.device, tokens * kv_heads, "fxp.attention's context split")
                if split.splits > 1 else None)
    if counters is None:  # no split, or no counters to be had (first use inside a capture): the whole context
        split = SplitPlan(1, max(k_cache.shape[1], 1))
        ws = wsm = counters = out  # unread
    else:
        ws = torch.empty(tokens * kv_heads * split.splits * block_g * block_dv, dtype=torch.float32, device=q.device)
        wsm = torch.empty(tokens * kv_heads * split.splits * 2 * block_g, dtype=torch.float32, device=q.device)
    _attention_kernel[(tokens, kv_heads, split.splits)](
        q, k_cache, v_cache, slot_ids, position_ids, out, k, v, cos, sin, ws, wsm, counters, float(scale),
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), sct, sst, group, dk, dv, half, tokens, split.chunk,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_T=max(triton.next_power_of_2(tokens), 16) if fuse_write else 16,
        SPLITS=split.splits, SPLITS_P2=triton.next_power_of_2(split.splits), IEEE=k_cache.dtype == torch.float32,
        WRITE=fuse_write, num_warps=4, **common,
    )
    return out


def attention_cuda(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale):
    _check(q, k, v, k_cache, v_cache, slot_ids, position_ids)
    return _launch(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale, None, q.shape[0] <= MAX_FUSED_TOKENS)


def _token_rows(table: torch.Tensor, tokens: int, dim: int) -> torch.Tensor | None:
    """cos/sin as [tokens, dim] rows (last dim contiguous) when they hold one row per token shared by the heads."""
    if table.dim() == 3 and table.shape[1] == 1:
        table = table[:, 0]
    if table.dim() == 2 and tuple(table.shape) == (tokens, dim) and table.stride(-1) == 1:
        return table
    return None


def rope_attention_cuda(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale, cos, sin, upcast):
    _check_rope(q, k, v, k_cache, v_cache, slot_ids, position_ids, cos, sin, upcast)
    c, s = _token_rows(cos, q.shape[0], cos.shape[-1]), _token_rows(sin, q.shape[0], cos.shape[-1])
    if c is None or s is None:  # another layout of the tables: rotate separately (correct, not fused)
        return attention_cuda(_rotate_last(q, cos, sin, upcast), _rotate_last(k, cos, sin, upcast), v, k_cache,
                              v_cache, slot_ids, position_ids, scale)
    return _launch(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale, (c, s, upcast),
                   q.shape[0] <= MAX_FUSED_TOKENS)


def register() -> None:
    LIB.impl("attention", attention_cuda, "CUDA")
    LIB.impl("attention.rope", rope_attention_cuda, "CUDA")
    TOKEN_PADDING[torch.ops.fxp.attention.default] = {"slot_ids": PAD_SLOT}
    TOKEN_PADDING[torch.ops.fxp.attention.rope] = {"slot_ids": PAD_SLOT}
