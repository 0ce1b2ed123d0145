"""A float64 reference for fxp.attention written token by token (no batching tricks), and random inputs for it."""
import torch


def attention_inputs(tokens, heads, kv_heads, dk, dv, slots, max_len, dtype, device="cpu", pad=0, seed=0):
    """q, k, v, caches (random, never zero), and each token's slot and position: the first tokens form a prefill of
    one sequence (consecutive positions of slot 0), the rest decode one token in distinct other slots; the last
    ``pad`` tokens are padding (slot -1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=g)
        return torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t).to(dtype).to(device)

    prefill = tokens // 2
    slot = torch.cat([torch.zeros(prefill, dtype=torch.long), 1 + torch.randperm(slots - 1, generator=g)[:tokens - prefill]])
    pos = torch.cat([torch.arange(prefill) + 3, torch.randint(0, max_len, (tokens - prefill,), generator=g)])
    if pad:
        slot[tokens - pad:] = -1
    return (rand(tokens, heads, dk), rand(tokens, kv_heads, dk), rand(tokens, kv_heads, dv),
            rand(slots, max_len, kv_heads, dk), rand(slots, max_len, kv_heads, dv), slot.to(device), pos.to(device))


def attention_ref64(q, k, v, k_cache, v_cache, slot_ids, position_ids, scale):
    """Returns (out, k_cache, v_cache) in float64 on the CPU; the input caches are not modified."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    kc, vc = k_cache.double().cpu().clone(), v_cache.double().cpu().clone()
    slot_ids, position_ids = slot_ids.tolist(), position_ids.tolist()
    for t, (s, p) in enumerate(zip(slot_ids, position_ids)):
        if s >= 0:
            kc[s, p], vc[s, p] = k[t], v[t]
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for t, (s, p) in enumerate(zip(slot_ids, position_ids)):
        if s < 0:
            continue
        for h in range(q.shape[1]):
            keys, values = kc[s, : p + 1, h // group], vc[s, : p + 1, h // group]
            weights = torch.softmax(keys @ q[t, h] * scale, dim=0)
            out[t, h] = weights @ values
    return out, kc, vc
