"""Triton kernels for ``fxp.attention`` on CUDA tensors: one launch writes the new keys and values into the cache,
a second computes every token's attention over its slot with an online softmax.

Why two launches: in a prefill, a token reads keys that other tokens of the same batch write, and programs of one
launch are not ordered. Each attention program handles one token and one key/value head, i.e. the group of query
heads that share it (grouped-query attention), so the cache rows are read once per group; it walks positions
``0..position_ids[t]`` in blocks of ``BLOCK_N``. Padded tokens (negative slot, ``ops.attention.PAD_SLOT``) write
nothing and get zeros, on the device: no host sync, so the op can be captured in a CUDA graph with padding.

Precision follows the reference: scores and the softmax in float32; the probabilities are rounded to the cache
dtype for the second product in bf16/fp16 (as FlashAttention does), and every product is IEEE float32 for float32
caches (no TF32). Known limit: one program per (token, kv head) means a single long sequence is read by few
programs; a split over the context (flash-decoding) is not done.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpasses.ops.attention import PAD_SLOT, _check
from fxpasses.ops.library import LIB, TOKEN_PADDING


@triton.jit
def _cache_write_kernel(K, V, KC, VC, SLOT, POS, skt, skh, svt, svh, skc_s, skc_l, skc_h, svc_s, svc_l, svc_h,
                        DK, DV, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(SLOT + t)
    pos = tl.load(POS + t)
    real = slot >= 0
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + t * skt + h * skh + dk, mask=dk < DK)
    tl.store(KC + slot * skc_s + pos * skc_l + h * skc_h + dk, k.to(KC.dtype.element_ty), mask=(dk < DK) & real)
    v = tl.load(V + t * svt + h * svh + dv, mask=dv < DV)
    tl.store(VC + slot * svc_s + pos * svc_l + h * svc_h + dv, v.to(VC.dtype.element_ty), mask=(dv < DV) & real)


@triton.jit
def _attention_kernel(Q, KC, VC, SLOT, POS, OUT, scale, sqt, sqh, skc_s, skc_l, skc_h, svc_s, svc_l, svc_h, sot, soh,
                      GROUP, DK, DV, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                      BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(SLOT + t)
    n_keys = tl.where(slot >= 0, tl.load(POS + t) + 1, 0)  # padded tokens read nothing
    slot = tl.maximum(slot, 0)
    g = tl.arange(0, BLOCK_G)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    heads = h * GROUP + g
    q = tl.load(Q + t * sqt + heads[:, None] * sqh + dk[None, :], mask=(g[:, None] < GROUP) & (dk[None, :] < DK),
                other=0.0).to(KC.dtype.element_ty)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    start = 0
    while start < n_keys:  # a while loop (not range) so Triton's CPU interpreter runs it too
        n = start + tl.arange(0, BLOCK_N)
        visible = n < n_keys
        k = tl.load(KC + slot * skc_s + n[:, None] * skc_l + h * skc_h + dk[None, :],
                    mask=visible[:, None] & (dk[None, :] < DK), other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(visible[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(VC + slot * svc_s + n[:, None] * svc_l + h * svc_h + dv[None, :],
                    mask=visible[:, None] & (dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
        start += BLOCK_N
    out = tl.where(denom[:, None] > 0, acc / tl.maximum(denom, 1e-30)[:, None], 0.0)
    tl.store(OUT + t * sot + heads[:, None] * soh + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=(g[:, None] < GROUP) & (dv[None, :] < DV))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_cuda(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale):
    _check(q, k, v, k_cache, v_cache, slot_ids, position_ids)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("fxp.attention: the caches' last dimension must be contiguous (they are written in place).")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    slot_ids, position_ids = slot_ids.contiguous(), position_ids.contiguous()
    tokens, heads, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[2]
    out = q.new_empty(tokens, heads, dv)
    if tokens == 0:
        return out
    block_dk, block_dv = max(triton.next_power_of_2(dk), 16), max(triton.next_power_of_2(dv), 16)
    _cache_write_kernel[(tokens, kv_heads)](
        k, v, k_cache, v_cache, slot_ids, position_ids, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], dk, dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv, num_warps=1,
    )
    group = heads // kv_heads
    block_n = 32 if max(block_dk, block_dv) <= 128 else 16
    _attention_kernel[(tokens, kv_heads)](
        q, k_cache, v_cache, slot_ids, position_ids, out, float(scale), q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1), group, dk, dv,
        BLOCK_G=max(triton.next_power_of_2(group), 16), BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
        IEEE=k_cache.dtype == torch.float32, num_warps=4,
    )
    return out


def register() -> None:
    LIB.impl("attention", attention_cuda, "CUDA")
    TOKEN_PADDING[torch.ops.fxp.attention.default] = {"slot_ids": PAD_SLOT}
