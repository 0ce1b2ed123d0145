"""A Llama-style decoder: grouped-query attention with RoPE, SwiGLU MLP, RMSNorm, residual stream; tensor
parallel (column-parallel QKV and gate-up, row-parallel output and down projections, each followed by an
all_reduce on the TP group) and pipeline parallel (see ``PipelineStage``)."""
from __future__ import annotations

from dataclasses import dataclass, replace

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
    shard,
)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_slots: int = 4
    max_len: int = 64
    dtype: torch.dtype = torch.float32
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    def validate(self, mapping: Mapping) -> None:
        check_divisible("num_heads", self.num_heads, mapping.tp_size)
        check_divisible("num_heads", self.num_heads, self.num_kv_heads)
        if self.num_kv_heads >= mapping.tp_size:
            check_divisible("num_kv_heads", self.num_kv_heads, mapping.tp_size)
        elif mapping.tp_size % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) is below tp_size ({mapping.tp_size}) and does not divide it; "
                "key/value heads are replicated only when tp_size is a multiple of num_kv_heads."
            )
        check_divisible("intermediate_size", self.intermediate_size, mapping.tp_size)
        mapping.pp_layers(self.num_layers)  # raises when there are more stages than layers

    def predicted_matches(self, mapping: Mapping, inductor: bool = False, cuda: bool = False) -> dict[str, int]:
        """``cuda``: the graph's tensors are on CUDA, where (without Inductor) every projection becomes one of the
        small-token GEMM ops: each RMSNorm is folded into the projection it feeds (the stage's first norm without
        a residual add into ``rms_norm_linear``, the others with their add into ``add_rms_norm_linear``: qkv and
        the LM head), the post-attention one together with gate_up and its SiLU-and-mul
        (``add_rms_norm_linear_silu_mul``); o and down stay ``linear``. Under TP the norms' residual adds follow
        an all_reduce, which stays on its own: the fused linear ops take the add and norm (one kernel fewer than
        ``allreduce_add_rms_norm`` and a projection, on a GPU where that op is NCCL plus the norm kernel)."""
        layers = mapping.pp_layers(self.num_layers)
        counts = predicted_matches(mapping, layers, extra_norms_per_layer=0)
        if not inductor:  # RoPE on q and k (then both folded into the layer's attention call), one SwiGLU activation
            counts.update(rotary_embedding=2 * len(layers), rope_attention=len(layers), silu_and_mul=len(layers))
        if cuda and not inductor:
            n = len(layers)
            last = 1 if mapping.is_last_pp_rank else 0
            counts = {"rotary_embedding": 2 * n, "rope_attention": n, "linear": 2 * n, "add_rms_norm_linear_silu_mul": n}
            # qkv of layers 1.. and the LM head; the first layer's qkv on a later stage norms the received pair
            with_add = (n - 1) + last + (0 if mapping.is_first_pp_rank else 1)
            counts.update({k: v for k, v in (("add_rms_norm_linear", with_add),
                                             ("rms_norm_linear", 1 if mapping.is_first_pp_rank else 0)) if v})
        return counts

    # named real shapes, for benchmarks (random weights)
    @classmethod
    def llama_3_2_1b(cls, **kw) -> "LlamaConfig":
        return replace(cls(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                           num_heads=32, num_kv_heads=8, rope_theta=500000.0, max_len=4096), **kw)

    @classmethod
    def llama_3_8b(cls, **kw) -> "LlamaConfig":
        return replace(cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                           num_heads=32, num_kv_heads=8, rope_theta=500000.0, max_len=4096), **kw)


def predicted_matches(mapping: Mapping, layers: range, extra_norms_per_layer: int) -> dict[str, int]:
    """The norm patterns the registry should fuse on this rank's stage (the configs add the elementwise ones).

    The first layer of the first stage norms the embedding (``rms_norm``); the first layer of a later stage adds the
    received pair (``add_rms_norm``: no all_reduce precedes it); every other norm follows an all_reduce plus residual
    add (``allreduce_add_rms_norm`` when tp > 1, ``add_rms_norm`` otherwise), including the final norm of the last
    stage. The last layer's all_reduce on a non-last stage is sent, not fused.
    """
    fused = "allreduce_add_rms_norm" if mapping.tp_size > 1 else "add_rms_norm"
    counts: dict[str, int] = {}

    def add(name: str, n: int) -> None:
        if n:
            counts[name] = counts.get(name, 0) + n

    n = len(layers)
    add("rms_norm" if mapping.is_first_pp_rank else "add_rms_norm", 1)
    add(fused, (n - 1) + n + (1 if mapping.is_last_pp_rank else 0))
    add("rms_norm", extra_norms_per_layer * n)
    return counts


def kv_shard(weight: torch.Tensor, kv_heads: int, p: Parallel) -> torch.Tensor:
    """This rank's key/value head rows: a 1/tp slice, or, when tp exceeds the head count, the one head that this
    rank's query heads use (replicated over tp / kv_heads ranks), as serving engines do."""
    if kv_heads >= p.tp:
        return shard(weight, 0, p.tp_rank, p.tp)
    return shard(weight, 0, p.tp_rank // (p.tp // kv_heads), kv_heads)


class LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig, i: int, p: Parallel) -> None:
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.heads, self.kv_heads, self.head_dim = c.num_heads // p.tp, max(1, c.num_kv_heads // p.tp), hd
        q = shard(make_weight(c.seed, f"layers.{i}.q", (c.num_heads * hd, d), c.dtype), 0, p.tp_rank, p.tp)
        k, v = (kv_shard(make_weight(c.seed, f"layers.{i}.{n}", (c.num_kv_heads * hd, d), c.dtype), c.num_kv_heads, p)
                for n in ("k", "v"))
        self.qkv = Linear(torch.cat([q, k, v], 0))
        self.o = row_parallel(c.seed, f"layers.{i}.o", d, c.num_heads * hd, p, c.dtype)
        self.cache = KVCache(c.max_slots, c.max_len, self.kv_heads, hd, hd, c.dtype)

    def forward(self, x, position_ids, slot_ids, rope):
        t = x.shape[0]
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = apply_rotary(q.view(t, self.heads, self.head_dim), rope)
        k = apply_rotary(k.view(t, self.kv_heads, self.head_dim), rope)
        v = v.view(t, self.kv_heads, self.head_dim)
        out = self.cache.attend(q, k, v, slot_ids, position_ids, self.head_dim ** -0.5)
        return self.o(out.reshape(t, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate/up column-parallel and down row-parallel (all-reduced unless reduce=False)."""

    def __init__(self, seed: int, prefix: str, hidden: int, inter: int, p: Parallel, dtype: torch.dtype,
                 reduce: bool = True) -> None:
        super().__init__()
        self.inter = inter // p.tp
        self.gate_up = column_parallel(seed, [(f"{prefix}.gate", inter), (f"{prefix}.up", inter)], hidden, p, dtype)
        self.down = row_parallel(seed, f"{prefix}.down", hidden, inter, p, dtype)
        if not reduce:
            self.down.parallel = None

    def forward(self, x):
        gate, up = self.gate_up(x).split([self.inter, self.inter], dim=-1)
        return self.down(F.silu(gate) * up)


class LlamaLayer(DecoderLayer):
    def __init__(self, c: LlamaConfig, i: int, p: Parallel) -> None:
        super().__init__()
        self.input_norm = norm(c.seed, f"layers.{i}.input_norm", c.hidden_size, c.rms_norm_eps, c.dtype)
        self.attn = LlamaAttention(c, i, p)
        self.post_norm = norm(c.seed, f"layers.{i}.post_norm", c.hidden_size, c.rms_norm_eps, c.dtype)
        self.mlp = SwiGLU(c.seed, f"layers.{i}.mlp", c.hidden_size, c.intermediate_size, p, c.dtype)


def build_llama(c: LlamaConfig, p: Parallel) -> PipelineStage:
    return build_stage(c, p, LlamaLayer)
