"""Building blocks shared by the reference models: deterministic weights, tensor-parallel linears, RoPE, RMSNorm,
attention over an in-place KV cache, and the pipeline-stage wiring.

Weights are generated per parameter name from a seed (``crc32`` of the name, not Python's randomized ``hash``),
so every rank builds exactly the full tensor it needs and slices its shard: a TP×PP model and a single-process
model with the same seed have the same weights.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from fxpasses import compat
from fxpasses.mapping import Mapping


DRAW_ON_DEVICE = "FXPASSES_DRAW_WEIGHTS_ON_DEVICE"


def make_weight(seed: int, name: str, shape: Sequence[int], dtype: torch.dtype, std: float | None = None) -> torch.Tensor:
    """Deterministic weights, drawn on the CPU (the generator's device) so that a model built under ``with
    torch.device("cuda")`` gets the same weights as one built on the CPU, then placed on the default device.

    ``FXPASSES_DRAW_WEIGHTS_ON_DEVICE=1`` draws on the default device instead: other values (the same on every run
    there), but an 8B model's 8e9 draws take seconds on a GPU instead of minutes on the CPU. Benchmarks that time
    kernels, not numbers against a CPU build, set it."""
    device = torch.get_default_device() if os.environ.get(DRAW_ON_DEVICE) == "1" else torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = std if std is not None else 1.0 / math.sqrt(shape[-1])
    return (torch.randn(*shape, generator=g, device=device) * std).to(device=torch.get_default_device(), dtype=dtype)


def shard(t: torch.Tensor, dim: int, rank: int, parts: int) -> torch.Tensor:
    size = t.shape[dim] // parts
    return t.narrow(dim, rank * size, size).contiguous()


@dataclass(frozen=True)
class Parallel:
    """What a module needs to know about its rank: the Mapping and the TP group's name (None when tp == 1)."""

    mapping: Mapping
    tp_group: str | None = None
    pp_group: str | None = None

    @property
    def tp(self) -> int:
        return self.mapping.tp_size

    @property
    def tp_rank(self) -> int:
        return self.mapping.tp_rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group (a functional all_reduce, as DTensor emits); nothing when tp == 1."""
        if self.tp == 1:
            return x
        return compat.functional_collectives().all_reduce(x, "sum", self.tp_group)


def check_divisible(what: str, count: int, tp: int) -> None:
    if count % tp != 0:
        raise ValueError(f"{what} ({count}) is not divisible by tp_size ({tp}); choose a tp_size that divides it.")


class Linear(nn.Module):
    """``y = x @ W.T`` with a given (already sharded) weight; ``reduce`` all-reduces a row-parallel output."""

    def __init__(self, weight: torch.Tensor, parallel: Parallel | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return self.parallel.all_reduce(y) if self.parallel is not None else y


def column_parallel(seed: int, parts: Sequence[tuple[str, int]], in_features: int, p: Parallel,
                    dtype: torch.dtype) -> Linear:
    """Fused projections (e.g. q, k, v), each split by output rows over the TP group, then concatenated."""
    shards = [shard(make_weight(seed, name, (rows, in_features), dtype), 0, p.tp_rank, p.tp) for name, rows in parts]
    return Linear(torch.cat(shards, 0))


def row_parallel(seed: int, name: str, out_features: int, in_features: int, p: Parallel, dtype: torch.dtype) -> Linear:
    """Split by input columns over the TP group; the output is all-reduced."""
    full = make_weight(seed, name, (out_features, in_features), dtype)
    return Linear(shard(full, 1, p.tp_rank, p.tp), parallel=p)


class RMSNorm(nn.Module):
    """Spelled as transformers spells it, so fxpasses' patterns see what real models give them."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def norm(seed: int, name: str, size: int, eps: float, dtype: torch.dtype) -> RMSNorm:
    return RMSNorm((1.0 + 0.1 * make_weight(seed, name, (size,), torch.float32, std=1.0)).to(dtype), eps)


class Rotary(nn.Module):
    """Rotate-half rotary embeddings. cos and sin are tables over every cache position; a stage looks them up once
    per forward and hands them to every layer (as transformers passes ``position_embeddings`` and serving engines
    keep a cos/sin cache). The rotation is computed in float32 and cast back once (a spelling
    ``fxp.rotary_embedding`` fuses)."""

    def __init__(self, dim: int, base: float, max_len: int) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
        freqs = torch.arange(max_len).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, dim]
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each token, shaped [tokens, 1, dim] to broadcast over heads."""
        return self.cos_table[positions][:, None, :], self.sin_table[positions][:, None, :]


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Per-layer key and value caches, written in place by fxp.attention."""

    def __init__(self, slots: int, max_len: int, kv_heads: int, k_dim: int, v_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(slots, max_len, kv_heads, k_dim, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(slots, max_len, kv_heads, v_dim, dtype=dtype), persistent=False)

    def attend(self, q, k, v, slot_ids, position_ids, scale: float) -> torch.Tensor:
        return torch.ops.fxp.attention(q, k, v, self.k, self.v, slot_ids, position_ids, scale)


@dataclass
class Batch:
    """One step of token-flattened input: every token's id, position in its sequence, and cache slot."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    slot_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def make_steps(vocab_size: int, prompt_lens: Sequence[int] = (5, 3), decode_steps: int = 4, seed: int = 0) -> list[Batch]:
    """A prefill of one prompt per slot, then ``decode_steps`` steps of one token per sequence (fixed, seeded)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    ids = torch.randint(0, vocab_size, (sum(prompt_lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in prompt_lens])
    slots = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(prompt_lens)])
    steps.append(Batch(ids, pos, slots))
    for k in range(decode_steps):
        steps.append(Batch(torch.randint(0, vocab_size, (len(prompt_lens),), generator=g),
                           torch.tensor([n + k for n in prompt_lens]),
                           torch.arange(len(prompt_lens))))
    return steps


class DecoderLayer(nn.Module):
    """The residual stream of a pre-norm decoder layer; subclasses set input_norm, attn, post_norm and mlp."""

    def forward(self, hidden, residual, position_ids, slot_ids, rope):
        if residual is None:  # first layer of the model: no residual yet (as the engine does)
            residual = hidden
            hidden = self.input_norm(hidden)
        else:
            residual = hidden + residual
            hidden = self.input_norm(residual)
        hidden = self.attn(hidden, position_ids, slot_ids, rope)
        residual = hidden + residual
        hidden = self.post_norm(residual)
        return self.mlp(hidden), residual


class PipelineStage(nn.Module):
    """The stage wiring shared by every model: embedding on the first stage; receive ``[hidden_states, residual]``
    on the others; this stage's layers; send the pair on, or final norm and LM head on the last stage."""

    def __init__(self, hidden: int, dtype: torch.dtype, p: Parallel, embed: nn.Module | None, rotary: Rotary,
                 layers: nn.ModuleList, final_norm: nn.Module | None, lm_head: nn.Module | None) -> None:
        super().__init__()
        self.hidden, self.dtype, self.p = hidden, dtype, p
        self.embed, self.rotary, self.layers, self.final_norm, self.lm_head = embed, rotary, layers, final_norm, lm_head

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, slot_ids: torch.Tensor):
        m = self.p.mapping
        if m.is_first_pp_rank:
            hidden, residual = self.embed(input_ids), None
        else:
            hidden = torch.empty(input_ids.shape[0], self.hidden, dtype=self.dtype, device=input_ids.device)
            residual = torch.empty(input_ids.shape[0], self.hidden, dtype=self.dtype, device=input_ids.device)
            torch.ops.fxp.pp_recv_tensors([hidden, residual], m.prev_pp_rank, self.p.pp_group)
        rope = self.rotary(position_ids)  # once per forward, shared by every layer
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, position_ids, slot_ids, rope)
        if not m.is_last_pp_rank:
            torch.ops.fxp.pp_send_tensors([hidden, residual], m.next_pp_rank, self.p.pp_group)
            return hidden, residual
        residual = hidden + residual
        return self.lm_head(self.final_norm(residual))


def build_stage(c, p: Parallel, make_layer) -> PipelineStage:
    """This rank's stage: embedding (first stage), ``make_layer(c, i, p)`` for its layers, final norm and LM head
    (last stage). ``c`` has vocab_size, hidden_size, num_layers, rms_norm_eps, rotary_dim, rope_theta, max_len,
    dtype and seed."""
    c.validate(p.mapping)
    m = p.mapping
    embed = lm_head = final = None
    if m.is_first_pp_rank:
        embed = nn.Embedding(c.vocab_size, c.hidden_size,
                             _weight=make_weight(c.seed, "embed", (c.vocab_size, c.hidden_size), c.dtype, std=1.0))
        embed.weight.requires_grad_(False)
    if m.is_last_pp_rank:
        final = norm(c.seed, "final_norm", c.hidden_size, c.rms_norm_eps, c.dtype)
        lm_head = Linear(make_weight(c.seed, "lm_head", (c.vocab_size, c.hidden_size), c.dtype))
    layers = nn.ModuleList(make_layer(c, i, p) for i in m.pp_layers(c.num_layers))
    rotary = Rotary(c.rotary_dim, c.rope_theta, c.max_len)
    return PipelineStage(c.hidden_size, c.dtype, p, embed, rotary, layers, final, lm_head).eval()
