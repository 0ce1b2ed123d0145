"""A DeepSeekV3-style decoder: MLA-style attention (low-rank query and key/value projections, each with its own
RMSNorm, a shared rotary key), a mixture of experts with a shared expert and top-k routing, and the first k layers
dense. Tensor parallel: attention heads are split over the TP group, routed experts are split over it (each rank
holds ``num_experts / tp`` whole experts), the shared expert and dense MLPs are split by intermediate size; one
all_reduce per attention and per MLP/MoE block."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxpasses.mapping import Mapping
from fxpasses.models.common import (
    DecoderLayer,
    KVCache,
    Linear,
    Parallel,
    PipelineStage,
    build_stage,
    apply_rotary,
    check_divisible,
    column_parallel,
    make_weight,
    norm,
    row_parallel,
)
from fxpasses.models.llama import SwiGLU, predicted_matches


@dataclass(frozen=True)
class DeepSeekConfig:
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    q_lora_rank: int = 32
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 8
    qk_rope_head_dim: int = 8
    v_head_dim: int = 8
    intermediate_size: int = 128  # dense layers
    moe_intermediate_size: int = 32
    num_experts: int = 4
    num_experts_per_tok: int = 2
    first_k_dense: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_slots: int = 4
    max_len: int = 64
    dtype: torch.dtype = torch.float32
    seed: int = 0

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim

    def validate(self, mapping: Mapping) -> None:
        check_divisible("num_heads", self.num_heads, mapping.tp_size)
        check_divisible("num_experts", self.num_experts, mapping.tp_size)
        check_divisible("intermediate_size", self.intermediate_size, mapping.tp_size)
        check_divisible("moe_intermediate_size", self.moe_intermediate_size, mapping.tp_size)
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts}).")
        mapping.pp_layers(self.num_layers)

    def predicted_matches(self, mapping: Mapping, inductor: bool = False) -> dict[str, int]:
        layers = mapping.pp_layers(self.num_layers)
        # plus the q_a and kv_a norms of every layer
        counts = predicted_matches(mapping, layers, extra_norms_per_layer=2)
        if not inductor:  # RoPE on q_pe and k_pe; a SwiGLU per dense layer, per local expert and shared expert
            local_experts = self.num_experts // mapping.tp_size
            counts.update(rotary_embedding=2 * len(layers), rope_attention=len(layers),
                          silu_and_mul=sum(1 if i < self.first_k_dense else 1 + local_experts for i in layers))
        return counts


class MLAttention(nn.Module):
    def __init__(self, c: DeepSeekConfig, i: int, p: Parallel) -> None:
        super().__init__()
        self.heads = c.num_heads // p.tp
        self.nope, self.rope, self.vdim, self.kv_rank = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        d = c.hidden_size
        self.q_a = Linear(make_weight(c.seed, f"layers.{i}.q_a", (c.q_lora_rank, d), c.dtype))
        self.q_a_norm = norm(c.seed, f"layers.{i}.q_a_norm", c.q_lora_rank, c.rms_norm_eps, c.dtype)
        self.q_b = column_parallel(c.seed, [(f"layers.{i}.q_b", c.num_heads * qk)], c.q_lora_rank, p, c.dtype)
        self.kv_a = Linear(make_weight(c.seed, f"layers.{i}.kv_a", (c.kv_lora_rank + c.qk_rope_head_dim, d), c.dtype))
        self.kv_a_norm = norm(c.seed, f"layers.{i}.kv_a_norm", c.kv_lora_rank, c.rms_norm_eps, c.dtype)
        self.kv_b = column_parallel(c.seed, [(f"layers.{i}.kv_b", c.num_heads * (c.qk_nope_head_dim + c.v_head_dim))],
                                    c.kv_lora_rank, p, c.dtype)
        self.o = row_parallel(c.seed, f"layers.{i}.o", d, c.num_heads * c.v_head_dim, p, c.dtype)
        self.cache = KVCache(c.max_slots, c.max_len, self.heads, qk, c.v_head_dim, c.dtype)
        self.scale = qk ** -0.5

    def forward(self, x, position_ids, slot_ids, rope):
        t = x.shape[0]
        q = self.q_b(self.q_a_norm(self.q_a(x))).view(t, self.heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv_a = self.kv_a(x)
        latent, k_pe = kv_a.split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b(self.kv_a_norm(latent)).view(t, self.heads, self.nope + self.vdim)
        k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
        q_pe = apply_rotary(q_pe, rope)
        k_pe = apply_rotary(k_pe.view(t, 1, self.rope), rope).expand(t, self.heads, self.rope)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe), dim=-1)
        out = self.cache.attend(q, k, v.contiguous(), slot_ids, position_ids, self.scale)
        return self.o(out.reshape(t, self.heads * self.vdim))


class Expert(nn.Module):
    """A whole routed expert (not TP-split: experts are distributed over the TP group instead)."""

    def __init__(self, seed: int, prefix: str, hidden: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.inter = inter
        self.gate_up = Linear(torch.cat([make_weight(seed, f"{prefix}.gate", (inter, hidden), dtype),
                                         make_weight(seed, f"{prefix}.up", (inter, hidden), dtype)]))
        self.down = Linear(make_weight(seed, f"{prefix}.down", (hidden, inter), dtype))

    def forward(self, x):
        gate, up = self.gate_up(x).split([self.inter, self.inter], dim=-1)
        return self.down(F.silu(gate) * up)


class MoE(nn.Module):
    def __init__(self, c: DeepSeekConfig, i: int, p: Parallel) -> None:
        super().__init__()
        self.p, self.top_k, self.num_experts = p, c.num_experts_per_tok, c.num_experts
        local = c.num_experts // p.tp
        self.first = p.tp_rank * local
        self.router = Linear(make_weight(c.seed, f"layers.{i}.router", (c.num_experts, c.hidden_size), c.dtype))
        self.experts = nn.ModuleList(Expert(c.seed, f"layers.{i}.experts.{e}", c.hidden_size, c.moe_intermediate_size, c.dtype)
                                     for e in range(self.first, self.first + local))
        self.shared = SwiGLU(c.seed, f"layers.{i}.shared", c.hidden_size, c.moe_intermediate_size, p, c.dtype, reduce=False)

    def forward(self, x):
        scores = torch.softmax(self.router(x).float(), dim=-1)
        top_w, top_i = torch.topk(scores, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        weights = torch.zeros_like(scores).scatter(1, top_i, top_w)  # [T, E], zero where not routed
        out = self.shared(x).float()
        for j, expert in enumerate(self.experts):
            e = self.first + j
            out = out + weights[:, e:e + 1] * expert(x).float()
        return self.p.all_reduce(out.to(x.dtype))


class DeepSeekLayer(DecoderLayer):
    def __init__(self, c: DeepSeekConfig, i: int, p: Parallel) -> None:
        super().__init__()
        self.input_norm = norm(c.seed, f"layers.{i}.input_norm", c.hidden_size, c.rms_norm_eps, c.dtype)
        self.attn = MLAttention(c, i, p)
        self.post_norm = norm(c.seed, f"layers.{i}.post_norm", c.hidden_size, c.rms_norm_eps, c.dtype)
        self.mlp = (SwiGLU(c.seed, f"layers.{i}.mlp", c.hidden_size, c.intermediate_size, p, c.dtype)
                    if i < c.first_k_dense else MoE(c, i, p))


def build_deepseek(c: DeepSeekConfig, p: Parallel) -> PipelineStage:
    return build_stage(c, p, DeepSeekLayer)
