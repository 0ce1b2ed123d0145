"""GPU: the Triton kernels against a float64 reference and the CPU implementation, and a compiled model on CUDA.
Skipped without CUDA (run with `make test-gpu` on the GPU machine)."""
import dataclasses

import pytest
import torch

import fxpasses
from fxpasses import ops

pytestmark = pytest.mark.gpu
fxp = torch.ops.fxp
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
HIDDEN = [1, 7, 1000, 4097, 8192]


def rand(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    t = torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t)  # random, never zero
    return t.to(dtype).cuda()


def ref64(x, w, eps, residual=None):
    x = x.double() + (residual.double() if residual is not None else 0)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def test_kernels_are_registered():
    assert ops.GPU_KERNELS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nan_and_inf_pass_through_the_kernels_as_on_cpu(dtype):
    """A NaN must stay NaN: the kernels' bit rounding once carried it into the sign bit (-0.0, zeros on CUDA)."""
    x, w = rand(4, 64, dtype=dtype), rand(64, dtype=dtype, seed=2)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    got, want = fxp.rms_norm(x, w, 1e-6).cpu(), fxp.rms_norm(x.cpu(), w.cpu(), 1e-6)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    cos, sin = rand(4, 1, 64, dtype=dtype, seed=3), rand(4, 1, 64, dtype=dtype, seed=4)
    q = x[:, None, :].contiguous()
    got, want = fxp.rotary_embedding(q, cos, sin, False).cpu(), fxp.rotary_embedding(q.cpu(), cos.cpu(), sin.cpu(), False)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm_and_add_rms_norm(dtype, hidden):
    x, r, w = rand(3, 5, hidden, dtype=dtype), rand(3, 5, hidden, dtype=dtype, seed=1), rand(hidden, dtype=dtype, seed=2)
    out = fxp.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out.double(), ref64(x, w, 1e-6), **TOL[dtype])
    torch.testing.assert_close(out.cpu(), fxp.rms_norm(x.cpu(), w.cpu(), 1e-6), **TOL[dtype])
    out, res = fxp.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, x + r)  # the sum is rounded to the input dtype exactly as eager rounds it
    torch.testing.assert_close(out.double(), ref64(res, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [7, 4097])
def test_fp8_variants(dtype, hidden):
    x, r, w = rand(6, hidden, dtype=dtype), rand(6, hidden, dtype=dtype, seed=1), rand(hidden, dtype=dtype, seed=2)
    scale = torch.tensor([0.02], device="cuda")
    q = fxp.rms_norm_quant_fp8(x, w, 1e-6, scale)
    expected = (ref64(x, w, 1e-6) / 0.02).clamp(-448, 448)
    torch.testing.assert_close(q.double(), expected, rtol=1 / 8, atol=2 ** -8)
    q2, res = fxp.add_rms_norm_quant_fp8(x, r, w, 1e-6, scale)
    torch.testing.assert_close(q2.double(), (ref64(res, w, 1e-6) / 0.02).clamp(-448, 448), rtol=1 / 8, atol=2 ** -8)
    # the CPU reference quantizes the same values: at most one fp8 step apart
    cpu = fxp.add_rms_norm_quant_fp8(x.cpu(), r.cpu(), w.cpu(), 1e-6, scale.cpu())[0]
    torch.testing.assert_close(q2.cpu().double(), cpu.double(), rtol=1 / 8, atol=2 ** -8)


def test_compiled_llama_on_cuda_equals_eager():
    from fxpasses.models import LlamaConfig, build_model, make_steps, run_steps

    config = dataclasses.replace(LlamaConfig(), dtype=torch.bfloat16)
    steps = [dataclasses.replace(b, **{k: getattr(b, k).cuda() for k in ("input_ids", "position_ids", "slot_ids")})
             for b in make_steps(config.vocab_size)]
    expected = run_steps(build_model("llama", config).cuda(), steps)
    model = build_model("llama", config).cuda()
    backend = fxpasses.Backend()
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    assert backend.report.matches == config.predicted_matches(fxpasses.Mapping(), cuda=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=5e-2, atol=5e-2)


def _cuda(batch):
    return dataclasses.replace(batch, **{k: getattr(batch, k).cuda() for k in ("input_ids", "position_ids", "slot_ids")})


@pytest.mark.parametrize("splitting_ops", [("fxp.attention",), ()], ids=["piecewise", "full"])
def test_cuda_graphs_inside_between_and_above_sizes_and_one_token(splitting_ops):
    """Prefill and decode at token counts inside, between and above the captured sizes, then 1-token decode (a
    second, static graph: Dynamo's 0/1 rule), each replayed several times; piecewise (attention eager, on the real
    tokens) and full (attention captured, padded slots marked -1). Every step equals eager."""
    from fxpasses.models import Batch, LlamaConfig, build_model, make_steps, run_steps

    config = dataclasses.replace(LlamaConfig(), dtype=torch.bfloat16, max_slots=6)
    g = torch.Generator().manual_seed(1)
    steps = make_steps(config.vocab_size, prompt_lens=(5, 3), decode_steps=4)  # 8 tokens (between), then 2 x4
    # a second prefill of 21 tokens in slots 2 and 3 (above the largest size: eager), then decode of 4 sequences
    steps.append(Batch(torch.randint(0, 128, (21,), generator=g), torch.cat([torch.arange(12), torch.arange(9)]),
                       torch.cat([torch.full((12,), 2), torch.full((9,), 3)])))
    for k in range(3):
        steps.append(Batch(torch.randint(0, 128, (4,), generator=g), torch.tensor([9 + k, 7 + k, 12 + k, 9 + k]),
                           torch.tensor([0, 1, 2, 3])))
    for k in range(3):  # one sequence left: 1 token per step
        steps.append(Batch(torch.randint(0, 128, (1,), generator=g), torch.tensor([15 + k]), torch.tensor([2])))
    steps = [_cuda(b) for b in steps]
    expected = run_steps(build_model("llama", config).cuda(), steps)
    model = build_model("llama", config).cuda()
    backend = fxpasses.Backend(cuda_graph_sizes=[2, 4, 16], splitting_ops=splitting_ops)
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    assert backend.report.graphs == 2
    dynamic, static = backend.runners
    kinds = [type(p).__name__ for p in dynamic.pieces.values()]
    if splitting_ops:
        assert kinds.count("EagerSplit") == config.num_layers
    else:
        assert kinds == ["CapturedPiece"]
    captured = [p for p in dynamic.pieces.values() if type(p).__name__ == "CapturedPiece"]
    assert all(p.entries[2].graph is not None and p.entries[4].graph is not None for p in captured)
    assert all(16 in p.entries and p.entries[16].graph is None for p in captured)  # seen once: warm-up only
    assert static.static_tokens == 1
    assert all(p.entries[1].graph is not None for p in static.pieces.values() if type(p).__name__ == "CapturedPiece")
    for p in captured:  # read in place: weights, caches, static buffers; copied per replay: nothing
        assert not p.entries[2].copied, p.entries[2].copied
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, step
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2, msg=f"step {step}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dk,dv", [(8, 8, 64, 64), (32, 8, 64, 64), (16, 2, 128, 128), (6, 2, 12, 10),
                                                  (4, 4, 192, 128)])
@pytest.mark.parametrize("pad", [0, 3])
def test_attention_kernel_matches_float64(dtype, heads, kv_heads, dk, dv, pad):
    from attention_ref import attention_inputs, attention_ref64

    assert torch.ops.fxp.attention.default in ops.TOKEN_PADDING  # the Triton kernel is the one registered
    q, k, v, kc, vc, slot, pos = attention_inputs(12, heads, kv_heads, dk, dv, slots=9, max_len=70, dtype=dtype,
                                                  device="cuda", pad=pad)
    out_ref, kc_ref, vc_ref = attention_ref64(q, k, v, kc, vc, slot, pos, dk ** -0.5)
    out = fxp.attention(q, k, v, kc, vc, slot, pos, dk ** -0.5)
    torch.testing.assert_close(out.double().cpu(), out_ref, **TOL[dtype])
    assert torch.equal(kc.cpu(), kc_ref.to(dtype)) and torch.equal(vc.cpu(), vc_ref.to(dtype))
    if pad:
        assert not out[-pad:].any()


def test_attention_kernel_replays_in_a_cuda_graph_with_padding():
    """Captured once for 8 tokens; replayed with new tokens of which the last 3 are padding: the cache gets exactly
    the real tokens and the outputs equal the float64 reference."""
    from attention_ref import attention_inputs, attention_ref64

    q, k, v, kc, vc, slot, pos = attention_inputs(8, 8, 2, 64, 64, slots=9, max_len=40, dtype=torch.bfloat16,
                                                  device="cuda")
    fxp.attention(q, k, v, kc.clone(), vc.clone(), slot, pos, 0.125)  # warm-up: compile the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fxp.attention(q, k, v, kc, vc, slot, pos, 0.125)
    q2, k2, v2, kc2, vc2, slot2, pos2 = attention_inputs(8, 8, 2, 64, 64, slots=9, max_len=40, dtype=torch.bfloat16,
                                                         device="cuda", pad=3, seed=1)
    for static, new in zip((q, k, v, kc, vc, slot, pos), (q2, k2, v2, kc2, vc2, slot2, pos2)):
        static.copy_(new)
    graph.replay()
    out_ref, kc_ref, vc_ref = attention_ref64(q2, k2, v2, kc2, vc2, slot2, pos2, 0.125)
    torch.testing.assert_close(out.double().cpu(), out_ref, **TOL[torch.bfloat16])
    assert torch.equal(kc.cpu(), kc_ref.to(torch.bfloat16)) and not out[-3:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("heads,dim", [(32, 64), (8, 128), (3, 10), (1, 64)])
def test_rotary_kernel_equals_the_composition(dtype, upcast, heads, dim):
    """The Triton kernel rounds where eager does: bit-identical to the composition in bf16/fp16 (float32: up to an
    fma's last bit). A kernel that rounded with .to(bf16).to(f32) was a bf16 step off in a quarter of the values."""
    x = rand(9, heads, dim, dtype=dtype)
    angles = rand(9, 1, dim, dtype=torch.float32, seed=1) * 3
    table = torch.float32 if upcast else dtype
    cos, sin = angles.cos().to(table), angles.sin().to(table)
    out = fxp.rotary_embedding(x, cos, sin, upcast)
    expected = fxp.rotary_embedding(x.cpu(), cos.cpu(), sin.cpu(), upcast)
    assert out.dtype == expected.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-6)
    elif not upcast:  # every product and the sum rounded to the dtype: nothing left for an fma to change
        assert torch.equal(out.cpu(), expected)
    else:  # one rounding of a float32 sum the GPU may form with an fma: rarely one step apart
        torch.testing.assert_close(out.cpu(), expected, **TOL[dtype])
        assert (out.cpu() != expected).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [1, 100, 8192, 14336 + 7])
def test_silu_and_mul_kernel_equals_eager(dtype, cols):
    gate_up = rand(5, 2 * cols, dtype=dtype)
    gate, up = gate_up.split([cols, cols], dim=-1)  # strided halves of one projection, as in a model
    out = fxp.silu_and_mul(gate, up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, **TOL[dtype])
