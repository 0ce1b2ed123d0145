"""fxp.attention.rope and the rope_attention pattern: q/k RoPE folded into the attention op.

CPU: the op is rotary_embedding twice then attention, bit for bit; the pattern fires through torch.compile with the
Backend on every RoPE spelling and on the reference Llama (numbers equal eager), and explains why it does not fire
where it must not. The Triton kernels run under Triton's CPU interpreter when Triton is importable
(``PYTHONPATH=<triton site> pytest ...``), in a subprocess with ``TRITON_INTERPRET=1``. GPU tests (marked) compare
the CUDA kernels and a compiled model with eager in bf16.
"""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fxpasses
from attention_ref import attention_inputs, attention_ref64
from fxpasses import compat, ops
from fxpasses.models import DeepSeekConfig, LlamaConfig, build_model, make_steps, run_steps
from fxpasses.testing import RecordingBackend, warmup_cuda_graph_backend
from pattern_helpers import compile_and_capture

fxp = torch.ops.fxp


def tables(tokens, dim, dtype, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(tokens, 1, dim, generator=g) * 6
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def case(tokens=6, heads=4, kv_heads=2, dim=8, dtype=torch.float32, pad=1, upcast=True, device="cpu"):
    q, k, v, kc, vc, slot, pos = attention_inputs(tokens, heads, kv_heads, dim, dim, slots=4, max_len=16, dtype=dtype,
                                                  device=device, pad=pad)
    cos, sin = tables(tokens, dim, torch.float32 if upcast else dtype, device=device)
    return q, k, v, kc, vc, slot, pos, cos, sin


# ---- the op on the CPU -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("pad", [0, 2])
def test_op_is_rotary_then_attention_bit_for_bit(dtype, upcast, pad):
    q, k, v, kc, vc, slot, pos, cos, sin = case(dtype=dtype, pad=pad, upcast=upcast)
    kc2, vc2 = kc.clone(), vc.clone()
    out = fxp.attention.rope(q, k, v, kc, vc, slot, pos, 0.3, cos, sin, upcast)
    want = fxp.attention(fxp.rotary_embedding(q, cos, sin, upcast), fxp.rotary_embedding(k, cos, sin, upcast), v, kc2,
                         vc2, slot, pos, 0.3)
    assert out.dtype == dtype and torch.equal(out, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the rotated keys are what the cache holds
    if pad:
        assert not out[-pad:].any()  # padded tokens: zero rows, nothing written (the caches equal the composition's)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_tables_rotate_the_last_features_of_each_head(dtype):
    """MLA's layout: each head is [unrotated | rotated]; tables of 4 features rotate the last 4 of 12."""
    q, k, v, kc, vc, slot, pos = attention_inputs(6, 4, 4, 12, 8, slots=4, max_len=16, dtype=dtype, pad=1)
    cos, sin = tables(6, 4, torch.float32)
    kc2, vc2 = kc.clone(), vc.clone()
    out = fxp.attention.rope(q, k, v, kc, vc, slot, pos, 0.3, cos, sin, True)

    def rotate(x):
        return torch.cat((x[..., :8], fxp.rotary_embedding(x[..., 8:], cos, sin, True)), dim=-1)

    assert torch.equal(out, fxp.attention(rotate(q), rotate(k), v, kc2, vc2, slot, pos, 0.3))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_padded_tokens_write_nothing():
    q, k, v, kc, vc, slot, pos, cos, sin = case(pad=6)  # every token padded
    before = kc.clone(), vc.clone()
    out = fxp.attention.rope(q, k, v, kc, vc, slot, pos, 0.3, cos, sin, True)
    assert not out.any() and torch.equal(kc, before[0]) and torch.equal(vc, before[1])


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(q=a["q"][..., :7], k=a["k"][..., :7], kc=a["kc"][..., :7], cos=a["cos"][..., :7],
                        sin=a["sin"][..., :7]), "cos and sin have 7 features, but the rotation needs an even number"),
    (lambda a: a.update(cos=a["cos"].expand(6, 3, 8)),
     "cos \\(6, 3, 8\\) must broadcast to the rotated part of q \\(6, 4, 8\\) without enlarging"),
    (lambda a: a.update(sin=a["sin"][:, :, :4]), "sin \\(6, 1, 4\\) must broadcast to the rotated part of q \\(6, 4, 8\\)"),
    (lambda a: a.update(cos=a["cos"][..., :3], sin=a["sin"][..., :3]), "cos and sin have 3 features, but the rotation needs an even"),
    (lambda a: a.update(cos=torch.ones(6, 1, 10), sin=torch.ones(6, 1, 10)), "at most the head_dim \\(8\\)"),
    (lambda a: a.update(cos=a["cos"].to("meta")), "argument 'cos' is on device meta but 'q' is on cpu"),
    (lambda a: a.update(sin=a["sin"].int()), "argument 'sin' has dtype torch.int32"),
    (lambda a: a.update(upcast=False), "pass upcast=True .* or cast the tables"),
    (lambda a: a.update(slot=a["slot"].int()), "slot_ids and position_ids must be int64"),
])
def test_bad_inputs_are_refused_naming_the_argument(change, message):
    q, k, v, kc, vc, slot, pos, cos, sin = case(dtype=torch.bfloat16)  # float32 tables
    a = dict(q=q, k=k, v=v, kc=kc, vc=vc, slot=slot, pos=pos, cos=cos, sin=sin, upcast=True)
    change(a)
    with pytest.raises(ValueError, match=message):
        fxp.attention.rope(a["q"], a["k"], a["v"], a["kc"], a["vc"], a["slot"], a["pos"], 0.3, a["cos"], a["sin"],
                           a["upcast"])


def test_position_outside_the_cache_is_refused_on_cpu():
    q, k, v, kc, vc, slot, pos, cos, sin = case(pad=0)
    pos[2] = 16
    with pytest.raises(ValueError, match="fxp.attention: token 2 has position_ids 16 but the caches hold 16"):
        fxp.attention.rope(q, k, v, kc, vc, slot, pos, 0.3, cos, sin, True)


# ---- the pattern, through torch.compile -----------------------------------------------------------------------
def rotate_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_slice(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


SPELLINGS = {
    "chunk, float32": (lambda x, c, s: (x.float() * c + rotate_chunk(x.float()) * s).to(x.dtype), True),
    "slice, float32": (lambda x, c, s: (x.float() * c + rotate_slice(x.float()) * s).to(x.dtype), True),
    "chunk, input dtype": (lambda x, c, s: x * c + rotate_chunk(x) * s, False),
    "slice, input dtype": (lambda x, c, s: rotate_slice(x) * s + x * c, False),
}


class Attention(torch.nn.Module):
    """q and k rotated by ``rotate`` and read by fxp.attention; caches as buffers (written in place)."""

    def __init__(self, rotate, dtype, kv_heads=2, dim=8):
        super().__init__()
        self.rotate = rotate
        self.register_buffer("kc", torch.zeros(4, 16, kv_heads, dim, dtype=dtype))
        self.register_buffer("vc", torch.zeros(4, 16, kv_heads, dim, dtype=dtype))

    def forward(self, q, k, v, slot, pos, cos, sin):
        return fxp.attention(self.rotate(q, cos, sin), self.rotate(k, cos, sin), v, self.kc, self.vc, slot, pos, 0.3)


def run_both(module_fn, dtype, args):
    eager_mod, compiled_mod = module_fn(), module_fn()
    with torch.no_grad():
        want = eager_mod(*args)
    got, backend, before, after = compile_and_capture(compiled_mod, args)
    return got, want, backend, before, after, (eager_mod, compiled_mod)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spelling", list(SPELLINGS) + ["fxp.rotary_embedding"])
def test_every_rope_spelling_fuses_and_equals_eager(spelling, dtype):
    if spelling == "fxp.rotary_embedding":  # what the rotary pattern leaves (or a model that calls the op)
        fn, upcast = (lambda x, c, s: fxp.rotary_embedding(x, c, s, True)), True
    else:
        fn, upcast = SPELLINGS[spelling]
    q, k, v, _, _, slot, pos, cos, sin = case(dtype=dtype, upcast=upcast)
    got, want, backend, before, after, (e, c) = run_both(lambda: Attention(fn, dtype), dtype, (q, k, v, slot, pos, cos, sin))
    # a spelling becomes fxp.rotary_embedding first (that pattern), which this one then folds into the attention
    fused_first = {} if spelling == "fxp.rotary_embedding" else {"rotary_embedding": 2}
    assert backend.report.matches == {**fused_first, "rope_attention": 1}
    assert after["fxp.attention.rope"] == 1 and "fxp.attention" not in after
    assert "fxp.rotary_embedding" not in after and "aten.cat" not in after and "aten.neg" not in after
    assert torch.equal(got, want)  # CPU: the op is the composition, the same functions in the same order
    assert torch.equal(c.kc, e.kc) and torch.equal(c.vc, e.vc)  # and the caches are written the same


@pytest.mark.parametrize("v2", [True, False], ids=["auto_functionalized_v2", "auto_functionalized"])
def test_both_functionalized_forms_fuse_and_caches_are_views(v2):
    """The attention call reaches the pattern as auto_functionalized (v1) or _v2, whichever torch's switch picks;
    here the caches are one slot of larger buffers (views: v2 encodes them as slices of a base), and the fused
    call keeps that encoding, so the writes land in the right slot."""
    dtype = torch.bfloat16
    fn = SPELLINGS["slice, float32"][0]

    class Sliced(Attention):
        def __init__(self):
            super().__init__(fn, dtype)
            self.register_buffer("kc", torch.zeros(2, 4, 16, 2, 8, dtype=dtype))
            self.register_buffer("vc", torch.zeros(2, 4, 16, 2, 8, dtype=dtype))

        def forward(self, q, k, v, slot, pos, cos, sin):
            return fxp.attention(fn(q, cos, sin), fn(k, cos, sin), v, self.kc[1], self.vc[1], slot, pos, 0.3)

    q, k, v, _, _, slot, pos, cos, sin = case(dtype=dtype)
    with compat.set_auto_functionalized_v2(v2):
        got, want, backend, before, after, (e, c) = run_both(Sliced, dtype, (q, k, v, slot, pos, cos, sin))
    hop = "auto_functionalized_v2" if v2 else "auto_functionalized"
    assert before[f"{hop}(fxp.attention)"] == 1
    assert backend.report.matches == {"rotary_embedding": 2, "rope_attention": 1}
    assert after["fxp.attention.rope"] == 1 and "fxp.attention" not in after
    assert torch.equal(got, want) and torch.equal(c.kc, e.kc) and torch.equal(c.vc, e.vc) and c.kc[1].any()


def test_a_model_calling_the_fused_op_compiles_and_equals_eager():
    """The op's schema declares both cache writes, so AOT functionalizes a direct call and the Backend puts the
    in-place call back (defunctionalize), like fxp.attention."""

    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kc", torch.zeros(4, 16, 2, 8))
            self.register_buffer("vc", torch.zeros(4, 16, 2, 8))

        def forward(self, q, k, v, slot, pos, cos, sin):
            out = fxp.attention.rope(q, k, v, self.kc, self.vc, slot, pos, 0.3, cos, sin, True)
            return out, self.kc.sum()

    q, k, v, _, _, slot, pos, cos, sin = case()
    got, want, backend, before, after, (e, c) = run_both(Direct, torch.float32, (q, k, v, slot, pos, cos, sin))
    assert before["auto_functionalized_v2(fxp.attention.rope)"] == 1 and after["fxp.attention.rope"] == 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(c.kc, e.kc)


@pytest.mark.parametrize("case_name, reason", [
    ("rotated q also returned", "the rotated q .* has another reader"),
    ("k rotated with other tables", "q is rotated with cos/sin .* and k with"),
    ("q rotated in float32, k in bf16", "different rounding"),
])
def test_near_misses_say_why(case_name, reason):
    dtype = torch.bfloat16
    up, low = SPELLINGS["chunk, float32"][0], SPELLINGS["chunk, input dtype"][0]

    class Odd(Attention):
        def forward(self, q, k, v, slot, pos, cos, sin):
            if case_name == "rotated q also returned":
                rq = up(q, cos, sin)
                return fxp.attention(rq, up(k, cos, sin), v, self.kc, self.vc, slot, pos, 0.3), rq
            if case_name == "k rotated with other tables":
                return fxp.attention(up(q, cos, sin), up(k, sin, cos), v, self.kc, self.vc, slot, pos, 0.3)
            return fxp.attention(up(q, cos, sin), low(k, cos, sin), v, self.kc, self.vc, slot, pos, 0.3)

    # bf16 tables for the mixed case (both rotations read the same two nodes), float32 otherwise
    q, k, v, _, _, slot, pos, cos, sin = case(dtype=dtype, upcast=case_name != "q rotated in float32, k in bf16")
    got, want, backend, _, after, _ = run_both(lambda: Odd(up, dtype), dtype, (q, k, v, slot, pos, cos, sin))
    assert "rope_attention" not in backend.report.matches
    assert backend.report.matches["rotary_embedding"] == 2 and after["fxp.attention"] == 1
    misses = [m for m in backend.report.near_misses if m.pattern == "rope_attention"]
    assert misses and any(__import__("re").search(reason, m.reason) for m in misses), backend.report.near_misses
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_fuses_every_layer_and_equals_eager(dtype):
    """Prefill (8 tokens, two sequences) and decode (2 tokens), one dynamic graph: every layer's RoPE goes into
    its attention call, and the logits equal eager's bit for bit (CPU)."""
    config = dataclasses.replace(LlamaConfig(), dtype=dtype)
    steps = make_steps(config.vocab_size, decode_steps=2)
    expected = run_steps(build_model("llama", config), steps)
    model = build_model("llama", config)
    backend = RecordingBackend()
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    assert backend.report.graphs == 1
    want = dict(config.predicted_matches(fxpasses.Mapping()))
    layers = config.num_layers
    assert backend.report.matches == {**want, "rope_attention": layers}
    assert backend.after["fxp.attention.rope"] == layers and "fxp.attention" not in backend.after
    assert "fxp.rotary_embedding" not in backend.after
    assert not [m for m in backend.report.near_misses if m.pattern == "rope_attention"]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_mla_rope_fuses_and_equals_eager(dtype):
    """MLA rotates the last qk_rope_head_dim features of each head (q = cat(q_nope, rot(q_pe))) and shares one
    rotated k_pe over the heads (k = cat(k_nope, rot(k_pe).expand(...))): the call gets q and k rebuilt from the
    unrotated parts the same way, and the narrow tables rotate each head's tail. Bit for bit on the CPU."""
    config = dataclasses.replace(DeepSeekConfig(num_layers=2), dtype=dtype)
    steps = make_steps(config.vocab_size, decode_steps=1)
    expected = run_steps(build_model("deepseek", config), steps)
    model = build_model("deepseek", config)
    backend = RecordingBackend()
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    assert backend.report.matches == {**config.predicted_matches(fxpasses.Mapping()), "rope_attention": 2}
    assert backend.after["fxp.attention.rope"] == 2 and "fxp.attention" not in backend.after
    assert "fxp.rotary_embedding" not in backend.after
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


class MLA(torch.nn.Module):
    """The MLA operand forms alone: q = cat(q_nope, rot(q_pe)), k = cat(k_nope, rot(k_pe).expand(heads))."""

    def __init__(self, leak=None):
        super().__init__()
        self.leak = leak
        self.register_buffer("kc", torch.zeros(4, 16, 4, 12))
        self.register_buffer("vc", torch.zeros(4, 16, 4, 8))

    def forward(self, q, k_nope, k_pe, v, slot, pos, cos, sin):
        q_nope, q_pe = q.split([8, 4], dim=-1)
        rq = fxp.rotary_embedding(q_pe, cos, sin, True)
        rk = fxp.rotary_embedding(k_pe, cos, sin, True).expand(-1, 4, -1)
        qq, kk = torch.cat((q_nope, rq), dim=-1), torch.cat((k_nope, rk), dim=-1)
        out = fxp.attention(qq, kk, v, self.kc, self.vc, slot, pos, 0.3)
        return (out, {"expanded k_pe": rk, "q": qq}[self.leak] * 2) if self.leak else out


def mla_inputs():
    g = torch.Generator().manual_seed(0)
    q, k_nope, k_pe, v = (torch.randn(*s, generator=g) for s in ((5, 4, 12), (5, 4, 8), (5, 1, 4), (5, 4, 8)))
    cos, sin = tables(5, 4, torch.float32)
    return q, k_nope, k_pe, v, torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 1, 2, 4, 7]), cos, sin


@pytest.mark.parametrize("leak, reason", [(None, None), ("expanded k_pe", "the expanded rotation of k .* has another reader"),
                                          ("q", "the rotated q .* has another reader")])
def test_mla_operands_fuse_unless_read_elsewhere(leak, reason):
    args = mla_inputs()
    got, want, backend, _, after, (e, c) = run_both(lambda: MLA(leak), torch.float32, args)
    if leak is None:
        assert backend.report.matches == {"rope_attention": 1} and after["fxp.attention.rope"] == 1
        assert torch.equal(got, want)
    else:
        assert "rope_attention" not in backend.report.matches and after["fxp.attention"] == 1
        misses = [m for m in backend.report.near_misses if m.pattern == "rope_attention"]
        assert any(__import__("re").search(reason, m.reason) for m in misses), backend.report.near_misses
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(c.kc, e.kc)


def test_piecewise_cuda_graphs_split_at_the_fused_op():
    """The fused op is an overload of fxp.attention, so the default split (``splitting_ops=("fxp.attention",)``)
    cuts at it too: it runs eagerly on the real tokens, with cos and sin sliced back like q, k and v."""
    steps = make_steps(128, prompt_lens=(5, 3), decode_steps=1)  # 8 tokens -> size 16, then 2 -> size 4
    expected = run_steps(build_model("llama"), steps)
    model = build_model("llama")
    backend = warmup_cuda_graph_backend([4, 16])
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    (runner,) = backend.runners
    splits = [p for p in runner.pieces.values() if type(p).__name__ == "EagerSplit"]
    assert len(splits) == 4 and backend.report.matches["rope_attention"] == 4
    assert all(len(p.token_args) == 7 for p in splits)  # q, k, v, slot_ids, position_ids, cos, sin
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)  # padding changes BLAS blocking, not results


def test_the_fused_op_marks_padding_like_attention():
    """Full CUDA graphs run the op on padded tokens: it is registered with the same marker as fxp.attention
    wherever the Triton kernels are (they skip slot -1 on the device)."""
    if ops.GPU_KERNELS:
        assert ops.TOKEN_PADDING[fxp.attention.rope] == ops.TOKEN_PADDING[fxp.attention.default] == {"slot_ids": -1}
    else:
        assert fxp.attention.rope not in ops.TOKEN_PADDING and fxp.attention.default not in ops.TOKEN_PADDING


# ---- the Triton kernels under the interpreter (CPU) ------------------------------------------------------------
INTERPRETED = r"""
import itertools, sys, torch
sys.path.insert(0, "tests")
from attention_ref import attention_inputs
import fxpasses.ops
from fxpasses.ops import triton_attention as ta
from fxpasses.ops.attention import rope_attention_reference, _attention
fails = []
# float16, not bf16: the interpreter's bf16 dot is wrong (numpy has no bf16; the original kernel fails there too)
# (heads, kv heads, head_dim, rotated features): whole heads, and MLA's rotated tail of each head
# tokens: 1 and 5 (one launch; 5 holds a 2-token prefill chunk of slot 0, whose rows come from the inputs), 70
# (above MAX_FUSED_TOKENS: the cache-write launch first)
for dtype, tokens, pad, upcast, (h, hkv, d, r) in itertools.product(
        [torch.float32, torch.float16], [1, 5, 70], [0, 2], [True, False], [(4, 2, 8, 8), (6, 2, 12, 12), (4, 4, 12, 4)]):
    if (tokens == 1 and pad) or (tokens == 70 and (dtype == torch.float16 or d != 12 or r != 12 or upcast)):
        continue
    q, k, v, kc, vc, s, p = attention_inputs(tokens, h, hkv, d, d, slots=40, max_len=80, dtype=dtype, pad=pad)
    g = torch.Generator().manual_seed(tokens)
    ang = torch.rand(tokens, 1, r, generator=g) * 6
    table = torch.float32 if upcast else dtype
    cos, sin = ang.cos().to(table), ang.sin().to(table)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, ref, got in (
            ("rope", lambda kc, vc: rope_attention_reference(q, k, v, kc, vc, s, p, 0.3, cos, sin, upcast),
             lambda kc, vc: ta.rope_attention_cuda(q, k, v, kc, vc, s, p, 0.3, cos, sin, upcast)),
            ("plain", lambda kc, vc: _attention(q, k, v, kc, vc, s, p, 0.3),
             lambda kc, vc: ta.attention_cuda(q, k, v, kc, vc, s, p, 0.3))):
        kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        a, b = ref(kc1, vc1), got(kc2, vc2)
        if not (torch.equal(kc1, kc2) and torch.equal(vc1, vc2) and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)):
            fails.append((name, dtype, tokens, pad, upcast, h, hkv, d, r))
# A prefill chunk in descending positions: the interpreter runs programs in order, so token 0 (the last position)
# reads rows that later programs write; only the rows taken from the inputs make it right.
for dtype, rope in itertools.product([torch.float32, torch.float16], [True, False]):
    q, k, v, kc, vc, s, p = attention_inputs(9, 4, 2, 8, 8, slots=5, max_len=20, dtype=dtype)
    s = torch.tensor([2, 2, 2, 2, 0, 2, 1, 3, -1])
    p = torch.tensor([9, 8, 7, 6, 4, 10, 3, 0, 5])
    ang = torch.rand(9, 1, 8) * 6
    cos, sin = ang.cos(), ang.sin()
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    if rope:
        a = rope_attention_reference(q, k, v, kc1, vc1, s, p, 0.3, cos, sin, True)
        b = ta.rope_attention_cuda(q, k, v, kc2, vc2, s, p, 0.3, cos, sin, True)
    else:
        a, b = _attention(q, k, v, kc1, vc1, s, p, 0.3), ta.attention_cuda(q, k, v, kc2, vc2, s, p, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    if not (torch.equal(kc1, kc2) and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)):
        fails.append(("descending chunk", dtype, rope))
# Split over the context (flash-decoding): forced plans, a prefill chunk whose rows fall in several splits, padding,
# rope; the arrival counters are back at zero afterwards.
from fxpasses.ops.arrival_counters import counters_idle
# (chunks small enough that most tokens use at least ta.MIN_USED_SPLITS of them; shorter ones take the one-walk path)
for dtype, tokens, rope, plan in [(torch.float32, 1, False, ta.SplitPlan(10, 8)), (torch.float16, 5, True, ta.SplitPlan(20, 4)),
                                  (torch.float32, 9, True, ta.SplitPlan(11, 1))]:
    q, k, v, kc, vc, s, p = attention_inputs(tokens, 4, 2, 8, 8, slots=40, max_len=80, dtype=dtype, pad=int(tokens > 1))
    if tokens == 9:  # descending positions of one slot, across chunks of 4
        s, p = torch.tensor([2, 2, 2, 2, 0, 2, 1, 3, -1]), torch.tensor([9, 8, 7, 6, 4, 10, 3, 0, 5])
    ang = torch.rand(tokens, 1, 8) * 6
    cos, sin = ang.cos(), ang.sin()
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    if rope:
        a = rope_attention_reference(q, k, v, kc1, vc1, s, p, 0.3, cos, sin, True)
        b = ta._launch(q, k, v, kc2, vc2, s, p, 0.3, (cos[:, 0], sin[:, 0], True), True, split=plan)
    else:
        a = _attention(q, k, v, kc1, vc1, s, p, 0.3)
        b = ta._launch(q, k, v, kc2, vc2, s, p, 0.3, None, True, split=plan)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    if not (torch.equal(kc1, kc2) and torch.equal(vc1, vc2) and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)):
        fails.append(("split", dtype, tokens, rope, plan))
if not counters_idle():
    fails.append("arrival counters left non-zero")
print("FAILS", fails)
sys.exit(1 if fails else 0)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not importable")
def test_triton_kernels_under_the_interpreter():
    """The rope kernels (cache write rotating k, attention rotating q) and the one-token single launch against the
    CPU reference: caches bit-equal (the same roundings), outputs within float tolerance."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not importable")
def test_context_split_plan(monkeypatch):
    """Small decode batches split long contexts over the idle SMs; a batch that fills the GPU, a short cache or
    FXPASSES_ATTENTION_SPLIT=0 does not; chunks are whole key blocks and cover the cache."""
    from fxpasses.ops import triton_attention as ta

    plan = ta.plan_splits(programs=8, cache_len=4104, block_n=32, sms=132)  # Llama-1B, one token, 4K context
    assert plan.splits > 1 and plan.chunk % 32 == 0 and plan.chunk >= ta.MIN_CHUNK
    assert (plan.splits - 1) * plan.chunk < 4104 <= plan.splits * plan.chunk
    assert plan.splits <= min(ta.MAX_SPLITS, ta.SPLIT_WAVES * 132 // 8)
    assert ta.plan_splits(programs=132, cache_len=4104, block_n=32, sms=132).splits == 1  # one full wave already
    assert ta.plan_splits(programs=8, cache_len=40, block_n=32, sms=132).splits == 1  # nothing worth splitting
    monkeypatch.setenv("FXPASSES_ATTENTION_SPLIT", "0")
    assert ta.plan_splits(programs=8, cache_len=4104, block_n=32, sms=132).splits == 1


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not importable")
def test_attention_kernel_compiles_for_sm90_with_and_without_the_context_split():
    """The kernel compiled ahead for Hopper (no GPU needed): a split launch takes arrival tickets, an unsplit one
    compiles no merge at all (no atomics), with and without the one-launch cache write."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from fxpasses.ops import triton_attention as ta

    kernel = ta._attention_kernel
    pointers = {"Q": "*bf16", "KC": "*bf16", "VC": "*bf16", "SLOT": "*i64", "POS": "*i64", "OUT": "*bf16",
                "K": "*bf16", "V": "*bf16", "COS": "*fp32", "SIN": "*fp32", "WS": "*fp32", "WSM": "*fp32",
                "CNT": "*i32", "scale": "fp32"}
    for splits, write in [(1, True), (1, False), (8, True), (32, False)]:
        const = dict(BLOCK_G=16, BLOCK_N=32, BLOCK_DK=64, BLOCK_DV=64, BLOCK_T=16, SPLITS=splits,
                     SPLITS_P2=triton.next_power_of_2(splits), IEEE=False, ROPE=True, UPCAST=True, WRITE=write)
        signature = {a: "constexpr" if a in const else pointers.get(a, "i32") for a in kernel.arg_names}
        ptx = triton_compile(ASTSource(kernel, signature, const, {}), target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=4)).asm["ptx"]
        assert ("atom.global" in ptx) == (splits > 1), (splits, write)


# ---- GPU -------------------------------------------------------------------------------------------------------
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _rotated_ref(q, k, cos, sin, upcast):
    """The CPU op's rotation (the reference's rounding) of the last cos.shape[-1] features, for the float64
    attention reference."""
    def rotate(x):
        x, rot = x.cpu(), cos.shape[-1]
        part = fxp.rotary_embedding(x[..., x.shape[-1] - rot:], cos.cpu(), sin.cpu(), upcast)
        return torch.cat((x[..., :x.shape[-1] - rot], part), dim=-1)

    return rotate(q), rotate(k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, upcast", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("tokens, pad", [(1, 0), (12, 3)])
@pytest.mark.parametrize("heads, kv_heads, dim, rot", [(32, 8, 64, 64), (6, 2, 12, 12), (16, 16, 192, 64)])
def test_gpu_rope_kernels_match_the_reference(dtype, upcast, tokens, pad, heads, kv_heads, dim, rot):
    """Whole heads rotated (Llama) and the last 64 of 192 features (DeepSeek-V3's MLA head)."""
    q, k, v, kc, vc, slot, pos = attention_inputs(tokens, heads, kv_heads, dim, dim, slots=13, max_len=70,
                                                  dtype=dtype, device="cuda", pad=pad)
    cos, sin = tables(tokens, rot, torch.float32 if upcast else dtype, device="cuda")
    rq, rk = _rotated_ref(q, k, cos, sin, upcast)
    out_ref, kc_ref, vc_ref = attention_ref64(rq, rk, v, kc, vc, slot, pos, dim ** -0.5)
    out = fxp.attention.rope(q, k, v, kc, vc, slot, pos, dim ** -0.5, cos, sin, upcast)
    torch.testing.assert_close(out.double().cpu(), out_ref, **TOL[dtype])
    assert torch.equal(vc.cpu(), vc_ref.to(dtype))
    if dtype == torch.float32 or upcast:  # a float32 sum the GPU may form with an fma: rarely one step apart
        torch.testing.assert_close(kc.cpu(), kc_ref.to(dtype), **TOL[dtype])
        assert (kc.cpu() != kc_ref.to(dtype)).float().mean() < 0.01
    else:  # every product and the sum rounded to the dtype: bit for bit
        assert torch.equal(kc.cpu(), kc_ref.to(dtype))
    if pad:
        assert not out[-pad:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [True, False])
def test_gpu_one_token_single_launch_reads_the_row_it_wrote(rope):
    """One token: the attention launch writes the cache row itself and then reads it. The row is poisoned first
    (a huge key), so reading it before the write lands would wreck the output; replayed in a CUDA graph too."""
    dtype, dim = torch.bfloat16, 64
    q, k, v, kc, vc, slot, pos = attention_inputs(1, 32, 8, dim, dim, slots=5, max_len=300, dtype=dtype,
                                                  device="cuda")
    pos.fill_(257)
    kc[slot[0], 257], vc[slot[0], 257] = 1e4, -1e4
    cos, sin = tables(1, dim, torch.float32, device="cuda")
    rq, rk = _rotated_ref(q, k, cos, sin, True) if rope else (q, k)
    out_ref, kc_ref, _ = attention_ref64(rq, rk, v, kc, vc, slot, pos, 0.125)

    def call(kc, vc):
        if rope:
            return fxp.attention.rope(q, k, v, kc, vc, slot, pos, 0.125, cos, sin, True)
        return fxp.attention(q, k, v, kc, vc, slot, pos, 0.125)

    eager_kc, eager_vc = kc.clone(), vc.clone()
    torch.testing.assert_close(call(eager_kc, eager_vc).double().cpu(), out_ref, **TOL[dtype])
    kc2, vc2 = kc.clone(), vc.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(kc2, vc2)
    for _ in range(3):
        kc2[slot[0], 257], vc2[slot[0], 257] = 1e4, -1e4
        graph.replay()
        torch.testing.assert_close(out.double().cpu(), out_ref, **TOL[dtype])
    torch.testing.assert_close(kc2.cpu(), kc_ref.to(dtype), **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens, pad", [(1, 0), (6, 2)])
def test_gpu_long_context_split_matches_the_reference(dtype, tokens, pad):
    """Contexts of up to 3000 positions split over the SMs (flash-decoding) as the op plans them: outputs equal the
    float64 reference, caches written as unsplit, eager and in CUDA-graph replays, counters back at zero."""
    from fxpasses.ops import triton_attention as ta
    from fxpasses.ops.arrival_counters import counters_idle

    q, k, v, kc, vc, slot, pos = attention_inputs(tokens, 32, 8, 64, 64, slots=9, max_len=3008, dtype=dtype,
                                                  device="cuda", pad=pad)
    pos = torch.tensor([2999, 1500, 64, 63, 0, 700][:tokens], device="cuda")
    plan = ta.plan_splits(tokens * 8, 3008, 32, torch.cuda.get_device_properties(0).multi_processor_count)
    assert plan.splits > 1
    cos, sin = tables(tokens, 64, torch.float32, device="cuda")
    rq, rk = _rotated_ref(q, k, cos, sin, True)
    out_ref, kc_ref, _ = attention_ref64(rq, rk, v, kc, vc, slot, pos, 0.125)
    kc1, vc1 = kc.clone(), vc.clone()
    out = fxp.attention.rope(q, k, v, kc1, vc1, slot, pos, 0.125, cos, sin, True)
    torch.testing.assert_close(out.double().cpu(), out_ref, **TOL[dtype])
    kc2, vc2 = kc.clone(), vc.clone()
    whole = ta._launch(q, k, v, kc2, vc2, slot, pos, 0.125, (cos[:, 0], sin[:, 0], True), True,
                       split=ta.SplitPlan(1, 3008))
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)  # the same cache write, split or not
    torch.testing.assert_close(out, whole, **TOL[dtype])
    kc3, vc3 = kc.clone(), vc.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fxp.attention.rope(q, k, v, kc3, vc3, slot, pos, 0.125, cos, sin, True)
    for _ in range(3):
        graph.replay()
        assert torch.equal(captured, out)  # deterministic: the splits merge in a fixed order
    torch.cuda.synchronize()
    assert counters_idle()


@pytest.mark.gpu
@pytest.mark.parametrize("name, splitting_ops", [("llama", ("fxp.attention",)), ("llama", ()), ("deepseek", ())],
                         ids=["llama-piecewise", "llama-full", "deepseek-full"])
def test_gpu_compiled_model_with_fused_rope_equals_eager(name, splitting_ops):
    """bf16 models on CUDA with CUDA graphs (prefill, 2-token decode, then 1-token decode: a second, static graph):
    RoPE folded into every attention call, every step equal to eager within the model tests' tolerance."""
    from fxpasses.models import Batch

    config = dataclasses.replace({"llama": LlamaConfig, "deepseek": DeepSeekConfig}[name](), dtype=torch.bfloat16,
                                 max_slots=6)
    steps = make_steps(config.vocab_size, prompt_lens=(5, 3), decode_steps=3)
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        steps.append(Batch(torch.randint(0, 128, (1,), generator=g), torch.tensor([9 + k]), torch.tensor([1])))
    steps = [dataclasses.replace(b, **{f: getattr(b, f).cuda() for f in ("input_ids", "position_ids", "slot_ids")})
             for b in steps]
    expected = run_steps(build_model(name, config).cuda(), steps)
    model = build_model(name, config).cuda()
    backend = fxpasses.Backend(cuda_graph_sizes=[1, 2, 4, 16], splitting_ops=splitting_ops)
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    assert backend.report.graphs == 2
    assert backend.report.matches.get("rope_attention") == 2 * config.num_layers  # both graphs, every layer
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2, msg=f"step {step}")
