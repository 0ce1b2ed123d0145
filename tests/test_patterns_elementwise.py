"""rotary_embedding and silu_and_mul: every RoPE spelling and dtype through torch.compile, results equal to eager,
near misses explained, and the patterns stay off the Inductor path."""
import pytest
import torch
import torch.nn.functional as F

import fxpasses
from pattern_helpers import compile_and_capture

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rotate_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_slice(x):  # transformers' rotate_half
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


SPELLINGS = {
    "chunk, float32": lambda x, c, s: (x.float() * c + rotate_chunk(x.float()) * s).to(x.dtype),
    "slice, float32": lambda x, c, s: (x.float() * c + rotate_slice(x.float()) * s).to(x.dtype),
    "chunk, input dtype": lambda x, c, s: x * c + rotate_chunk(x) * s,
    "slice, input dtype": lambda x, c, s: rotate_slice(x) * s + x * c,  # operands in the other order
}


def rope_inputs(dtype, shape=(5, 4, 16), table_dtype=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    angles = torch.rand(shape[0], 1, shape[-1], generator=g) * 6
    table_dtype = table_dtype or dtype
    return x, angles.cos().to(table_dtype), angles.sin().to(table_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_rotary_spellings_fuse_and_equal_eager(spelling, dtype):
    fn = SPELLINGS[spelling]
    args = rope_inputs(dtype, table_dtype=torch.float32 if "float32" in spelling else dtype)
    out, backend, before, after = compile_and_capture(fn, args)
    assert backend.report.matches == {"rotary_embedding": 1}
    assert before["aten.cat"] == 1 and "aten.cat" not in after and "aten.neg" not in after
    assert after["fxp.rotary_embedding"] == 1
    assert torch.equal(out, fn(*args))  # the op rounds exactly where the spelling does


def test_rotary_with_transformers_layout_and_dynamic_tokens():
    """[batch, heads, seq, dim] with cos [batch, 1, seq, dim], the sequence length dynamic (the dim wildcard is
    normalized: transformers' slices say dim 3 where its cat says -1)."""
    x, c, s = rope_inputs(torch.bfloat16, shape=(2, 4, 7, 8))
    c, s = c[:, :, None, :].expand(2, 1, 7, 8).contiguous(), s[:, :, None, :].expand(2, 1, 7, 8).contiguous()
    for t in (x, c, s):
        torch._dynamo.mark_dynamic(t, 2)
    fn = SPELLINGS["slice, input dtype"]
    out, backend, _, after = compile_and_capture(fn, (x, c, s))
    assert backend.report.matches == {"rotary_embedding": 1} and after["fxp.rotary_embedding"] == 1
    assert torch.equal(out, fn(x, c, s))


@pytest.mark.parametrize("case, reason", [
    ("not the last dim", "not the last one"),
    ("split off-centre", "not at half of the last dimension"),
    ("cos enlarges x", "enlarge x"),
])
def test_rotary_near_misses_say_why(case, reason):
    x, c, s = rope_inputs(torch.float32, shape=(6, 4, 8))
    if case == "not the last dim":
        fn = lambda x, c, s: x * c + torch.cat((-x[:, 2:], x[:, :2]), dim=1) * s  # noqa: E731  (rotates heads)
        c, s = c[..., :1], s[..., :1]  # [6, 1, 1]
    elif case == "split off-centre":
        fn = lambda x, c, s: x * c + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * s  # noqa: E731  (6 + 4)
        x = torch.randn(6, 4, 10)
        c, s = c[..., :1].expand(6, 1, 10), s[..., :1].expand(6, 1, 10)
    else:
        fn = lambda x, c, s: x * c + rotate_chunk(x) * s  # noqa: E731
        x = x[:, :1]  # [6, 1, 8] against cos and sin [6, 3, 8]: the result is larger than x
        c, s = c.expand(6, 3, 8), s.expand(6, 3, 8)
    out, backend, _, _ = compile_and_capture(fn, (x, c, s))
    assert "rotary_embedding" not in backend.report.matches
    near = [n for n in backend.report.near_misses if n.pattern == "rotary_embedding"]
    assert near and reason in near[0].reason, backend.report.near_misses
    torch.testing.assert_close(out, fn(x, c, s))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_fuses_in_both_orders(dtype):
    def swiglu(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up, up * F.silu(gate * 2)

    x = torch.randn(5, 24).to(dtype)
    out, backend, before, after = compile_and_capture(swiglu, (x,))
    assert backend.report.matches == {"silu_and_mul": 2}
    assert "aten.silu" not in after and after["fxp.silu_and_mul"] == 2
    for a, b in zip(out, swiglu(x)):
        assert torch.equal(a, b)


def test_silu_times_a_broadcast_is_left_alone():
    fn = lambda g, u: F.silu(g) * u  # noqa: E731
    g, u = torch.randn(5, 8), torch.randn(1, 8)
    out, backend, _, after = compile_and_capture(fn, (g, u))
    assert "silu_and_mul" not in backend.report.matches and after["aten.silu"] == 1
    torch.testing.assert_close(out, fn(g, u))


def test_elementwise_patterns_stay_off_the_inductor_path():
    eager = fxpasses.Backend()
    inductor = fxpasses.Backend(inductor=True)
    names = lambda b: {n for p in b.patterns if hasattr(p, "pattern_set") for n in p.pattern_set.names()}  # noqa: E731
    assert {"rotary_embedding", "silu_and_mul"} <= names(eager)
    assert not {"rotary_embedding", "silu_and_mul"} & names(inductor)
