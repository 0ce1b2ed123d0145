"""Every fxp op against a float64 reference, fake implementations against eager, and input validation."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fxpasses import ops  # noqa: F401
from fxpasses.testing import fake_process_group

fxp = torch.ops.fxp
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The ops round twice (the normalized value, then the product with the weight), so allow two ulps.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def ref_rms_norm(x, w, eps):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def inputs(dtype, shape=(5, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    return x, r, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm_matches_float64(dtype, eps):
    x, _, w = inputs(dtype)
    out = fxp.rms_norm(x, w, eps)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref_rms_norm(x, w, eps), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_float64(dtype):
    x, r, w = inputs(dtype, shape=(2, 3, 40))
    out, res = fxp.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(res, x + r, rtol=0, atol=0)  # the sum is in the input dtype, exactly as eager
    torch.testing.assert_close(out.double(), ref_rms_norm(x + r, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_add_rms_norm_single_rank_group(dtype):
    """Under the fake process group all_reduce returns its input, so the op reduces to add_rms_norm."""
    x, r, w = inputs(dtype)
    with fake_process_group(2, 0) as world:
        out, res = fxp.allreduce_add_rms_norm(x, r, w, 1e-6, world.group_name)
    ref_out, ref_res = fxp.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0)


def ref_quant(x, scale):
    return (x.double() / scale.double()).clamp(-448.0, 448.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_fp8_matches_float64(dtype):
    x, _, _ = inputs(dtype)
    x = x * 100  # reach the clamp
    scale = torch.tensor([0.5])
    q = fxp.quant_fp8(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    # e4m3 has 3 mantissa bits: round-to-nearest is within 1/16 relative, plus subnormal spacing 2**-9.
    torch.testing.assert_close(q.double(), ref_quant(x, scale), rtol=1 / 16, atol=2**-9)
    assert q.double().abs().max() <= 448


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_quant_ops_equal_their_composition(dtype):
    x, r, w = inputs(dtype)
    scale = torch.tensor([0.05])
    eps = 1e-6
    q = fxp.rms_norm_quant_fp8(x, w, eps, scale)
    assert torch.equal(q.view(torch.uint8), fxp.quant_fp8(fxp.rms_norm(x, w, eps), scale).view(torch.uint8))
    q2, res = fxp.add_rms_norm_quant_fp8(x, r, w, eps, scale)
    out, res_ref = fxp.add_rms_norm(x, r, w, eps)
    assert torch.equal(q2.view(torch.uint8), fxp.quant_fp8(out, scale).view(torch.uint8))
    assert torch.equal(res, res_ref)
    with fake_process_group(2, 1) as world:
        q3, res3 = fxp.allreduce_add_rms_norm_quant_fp8(x, r, w, eps, scale, world.group_name)
    assert torch.equal(q3.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(res3, res)
    torch.testing.assert_close(q.double(), ref_quant(ref_rms_norm(x, w, eps), scale), rtol=1 / 8, atol=2**-8)


CASES = [
    ("rms_norm", lambda x, r, w, s, g: (x, w, 1e-6)),
    ("add_rms_norm", lambda x, r, w, s, g: (x, r, w, 1e-6)),
    ("allreduce_add_rms_norm", lambda x, r, w, s, g: (x, r, w, 1e-6, g)),
    ("quant_fp8", lambda x, r, w, s, g: (x, s)),
    ("rms_norm_quant_fp8", lambda x, r, w, s, g: (x, w, 1e-6, s)),
    ("add_rms_norm_quant_fp8", lambda x, r, w, s, g: (x, r, w, 1e-6, s)),
    ("allreduce_add_rms_norm_quant_fp8", lambda x, r, w, s, g: (x, r, w, 1e-6, s, g)),
    ("rotary_embedding", lambda x, r, w, s, g: (x, r[:, :1], r[:, :1] * 0.5, True)),
    ("silu_and_mul", lambda x, r, w, s, g: (x, r)),
]


@pytest.mark.parametrize("name, make_args", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_matches_eager(name, make_args, dtype):
    x, r, w = inputs(dtype, shape=(3, 7, 16))
    with fake_process_group(2, 0) as world:
        eager = getattr(fxp, name)(*make_args(x, r, w, torch.tensor([0.1]), world.group_name))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = make_args(*(mode.from_tensor(t) for t in (x, r, w, torch.tensor([0.1]))), world.group_name)
            fake = getattr(fxp, name)(*fake_args)
    eager = eager if isinstance(eager, tuple) else (eager,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [(t.shape, t.dtype, t.stride()) for t in fake] == [(t.shape, t.dtype, t.stride()) for t in eager]


def test_bad_inputs_say_what_to_change():
    x, r, w = inputs(torch.float32)
    with pytest.raises(ValueError, match="argument 'x' has dtype torch.int64.*Cast the input first"):
        fxp.rms_norm(x.long(), w, 1e-6)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\) but the input's last dimension is 24"):
        fxp.rms_norm(x, w[:7], 1e-6)
    with pytest.raises(ValueError, match="residual is .* they must have the same shape and dtype"):
        fxp.add_rms_norm(x, r.half(), w, 1e-6)
    with pytest.raises(ValueError, match="scale must be a float32 tensor with one element"):
        fxp.quant_fp8(x, torch.ones(3))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the fake checks too, so tracing fails early
        with pytest.raises(ValueError, match="argument 'x' has dtype torch.int32"):
            fxp.rms_norm(mode.from_tensor(x.int()), mode.from_tensor(w), 1e-6)


def test_p2p_validation_under_fake_pg():
    from fxpasses import Mapping, init_process_groups

    m = Mapping(world_size=4, rank=1, tp_size=2, pp_size=2)
    with fake_process_group(4, 1):
        g = init_process_groups(m)
        fxp.pp_send(torch.ones(3), 3, g.pp.group_name)  # a no-op on the fake backend
        with pytest.raises(ValueError, match=r"peer 2 is not in group .* whose global ranks are \[1, 3\]"):
            fxp.pp_send(torch.ones(3), 2, g.pp.group_name)
        with pytest.raises(ValueError, match="peer 1 is this rank itself"):
            fxp.pp_recv(torch.ones(3), 1, g.pp.group_name)
        with pytest.raises(ValueError, match="buffer 1 .* is not contiguous"):
            fxp.pp_send_tensors([torch.ones(3), torch.ones(4, 4).t()], 3, g.pp.group_name)
        with pytest.raises(ValueError, match="no process group is named 'nope'"):
            fxp.pp_recv_tensors([torch.ones(3)], 3, "nope")


def test_sends_are_registered_side_effecting():
    import torch.fx

    for op in (fxp.pp_send, fxp.pp_recv, fxp.pp_send_tensors, fxp.pp_recv_tensors):
        assert op.default in ops.SIDE_EFFECT_OPS
        assert op.default in torch.fx.node._side_effectful_functions
        assert any(a.alias_info is not None and a.alias_info.is_write for a in op.default._schema.arguments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [0, 2])
def test_attention_writes_cache_and_matches_float64(dtype, pad):
    """Prefill and decode tokens in one call, grouped-query heads, key and value head dims that differ; padded
    tokens (slot -1) write nothing and get zeros."""
    from attention_ref import attention_inputs, attention_ref64

    q, k, v, kc, vc, slot, pos = attention_inputs(8, 6, 2, 12, 10, slots=5, max_len=16, dtype=dtype, pad=pad)
    out_ref, kc_ref, vc_ref = attention_ref64(q, k, v, kc, vc, slot, pos, 0.3)
    out = torch.ops.fxp.attention(q, k, v, kc, vc, slot, pos, 0.3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), out_ref, **tol)
    assert torch.equal(kc, kc_ref.to(dtype)) and torch.equal(vc, vc_ref.to(dtype))  # only real tokens were written
    if pad:
        assert not out[-pad:].any()


def test_fp16_no_upcast_norm_is_left_as_written():
    """The fp16 ``no_upcast`` RMSNorm spelling squares in fp16, so one element of |x| >= 256 makes x*x inf (fp16's
    largest is 65504), rsqrt(inf) = 0 and eager's row comes out all zeros; ``fxp.rms_norm`` squares in float32 and
    returns the normalized row. Fusing would change the model's numbers (there, and in the last bits elsewhere), so
    the Backend leaves that spelling alone in fp16 and says why: compiled equals eager, zeros included."""
    import fxpasses

    class NoUpcast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(16, generator=torch.Generator().manual_seed(1)).half() + 0.5)

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).half()
    x[1, 0], x[2, 0] = 255.875, 256.0  # the largest fp16 whose square is finite, and the next one
    model = NoUpcast()
    with torch.no_grad():
        eager = model(x)
        fused = fxp.rms_norm(x, model.weight, 1e-6)
        torch._dynamo.reset()
        backend = fxpasses.Backend(patterns=["rms_norm"])
        compiled = torch.compile(model, backend=backend)(x)
    assert backend.report.matches == {}
    (miss,) = backend.report.near_misses
    assert "normalizes in torch.float16" in miss.reason and "not fused" in miss.reason
    assert torch.equal(compiled, eager)
    want = ref_rms_norm(x, model.weight, 1e-6)
    torch.testing.assert_close(fused.double(), want, **TOL[torch.float16])  # the op itself upcasts: no overflow
    torch.testing.assert_close(eager[:2].double(), want[:2], rtol=5e-3, atol=5e-3)  # no overflow: rounding only
    assert not eager[2].any() and want[2].abs().max() > 1  # overflow: eager's row is zeros, and so is compiled's
