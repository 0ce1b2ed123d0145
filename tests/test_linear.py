"""fxp.linear (op, CPU reference, Triton kernels on CUDA) and the ``linear`` / ``linear_bias`` patterns.

CPU: the op is F.linear bit for bit; bad input gets errors naming the argument; the patterns replace what AOT
makes of F.linear in graphs of CUDA tensors (traced with fake tensors, so no GPU is needed) and leave CPU graphs
and the Inductor path alone; the rewritten graph computes exactly what the original did. GPU (marked): the Triton
kernels against a float64 reference and cuBLAS at Llama-like and odd shapes, inside a CUDA graph, and a compiled
Llama with full CUDA graphs equal to eager.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fxpasses
from fxpasses import patterns
from fxpasses.patterns import rms_norm_spellings
from fxpasses.passes import PipelineConfig

fxp = torch.ops.fxp
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rand(*shape, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 3, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_op_is_f_linear_bit_for_bit(dtype, shape, bias):
    x, w = rand(*shape, dtype=dtype), rand(48, 64, dtype=dtype, seed=1)
    b = rand(48, dtype=dtype, seed=2) if bias else None
    assert torch.equal(fxp.linear(x, w, b), F.linear(x, w, b))
    meta = fxp.linear(x.to("meta"), w.to("meta"), b.to("meta") if bias else None)
    assert meta.shape == (*shape[:-1], 48) and meta.dtype == dtype


@pytest.mark.parametrize("args,message", [
    (lambda: (rand(2, 8), rand(4, 9), None), "in_features"),
    (lambda: (rand(2, 8), rand(4, 8, 1), None), "weight must be 2-D"),
    (lambda: (rand(2, 8), rand(4, 8, dtype=torch.float16), None), "weight is torch.float16"),
    (lambda: (rand(2, 8), rand(4, 8), rand(5)), "bias is (5,)"),
    (lambda: (rand(2, 8).to(torch.int32), rand(4, 8), None), "argument 'x'"),
])
def test_bad_input_names_the_argument(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fxp.linear(*args())


def _two_layers(x, w1, w2, b):
    return F.linear(torch.relu(F.linear(x, w1)), w2, b)


def _traced(device):
    with FakeTensorMode():
        args = (torch.empty(4, 16, device=device, dtype=torch.bfloat16),
                torch.empty(32, 16, device=device, dtype=torch.bfloat16),
                torch.empty(8, 32, device=device, dtype=torch.bfloat16), torch.empty(8, device=device, dtype=torch.bfloat16))
        return make_fx(_two_layers, tracing_mode="fake")(*args)


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_patterns_replace_mm_and_addmm_of_cuda_tensors_and_compute_the_same():
    gm, report = fxpasses.rewrite(_traced("cuda"))
    assert report.matches == {"linear": 1, "linear_bias": 1}
    targets = _targets(gm)
    assert targets.count("fxp.linear.default") == 2
    assert not any(t.startswith(("aten.mm", "aten.addmm", "aten.t")) for t in targets)
    # the graph carries no device: run it on CPU tensors, where fxp.linear is F.linear: bit-identical to eager
    args = (rand(4, 16), rand(32, 16, seed=1), rand(8, 32, seed=2), rand(8, seed=3))
    assert torch.equal(gm(*args), _two_layers(*args))


def test_patterns_leave_cpu_graphs_alone():
    gm, report = fxpasses.rewrite(_traced("cpu"))
    assert report.matches == {}
    assert "fxp.linear.default" not in _targets(gm) and "aten.mm.default" in _targets(gm)


def test_bias_that_addmm_broadcasts_is_not_fused():
    def f(x, w, b):
        return torch.addmm(b, x, w.t())

    with FakeTensorMode():
        args = (torch.empty(4, 16, device="cuda"), torch.empty(8, 16, device="cuda"), torch.empty(4, 8, device="cuda"))
        gm = make_fx(f, tracing_mode="fake")(*args)
    gm, report = fxpasses.rewrite(gm)
    assert report.matches == {} and "aten.addmm.default" in _targets(gm)


def test_compiled_on_cpu_is_unchanged_and_patterns_are_off_under_inductor():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))
    model = model.to(torch.bfloat16).requires_grad_(False)
    x = rand(5, 16)
    backend = fxpasses.Backend()
    torch._dynamo.reset()
    got = torch.compile(model, backend=backend)(x)
    assert "linear" not in backend.report.matches and "linear_bias" not in backend.report.matches
    assert torch.equal(got, model(x))
    for name in ("linear", "linear_bias"):
        p = patterns.get(name)
        assert p.applies(fxpasses.Mapping(), PipelineConfig(defunctionalize=True))
        assert not p.applies(fxpasses.Mapping(), PipelineConfig(defunctionalize=False))  # the Inductor path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_add_rms_norm_linear_is_the_composition_bit_for_bit(dtype):
    x, r, nw, w = rand(3, 64, dtype=dtype), rand(3, 64, dtype=dtype, seed=1), rand(64, dtype=dtype, seed=2), rand(
        48, 64, dtype=dtype, seed=3)
    y, h = fxp.add_rms_norm_linear(x, r, nw, 1e-5, w)
    normed, h_ref = fxp.add_rms_norm(x, r, nw, 1e-5)
    assert torch.equal(h, h_ref) and torch.equal(y, F.linear(normed, w))
    with pytest.raises(ValueError, match="in_features"):
        fxp.add_rms_norm_linear(x, r, nw, 1e-5, rand(48, 63, dtype=dtype))


def _residual_block(x, r, nw, w1, w2):
    h = x + r
    y = F.linear(rms_norm_spellings()[0](h, nw, 1e-5), w1)
    return F.linear(torch.relu(y), w2) + h


def test_add_rms_norm_linear_pattern_on_cuda_graphs_computes_the_same():
    shapes = [(2, 16), (2, 16), (16,), (32, 16), (16, 32)]
    with FakeTensorMode():
        gm = make_fx(_residual_block, tracing_mode="fake")(
            *[torch.empty(*s, device="cuda", dtype=torch.bfloat16) for s in shapes])
    gm, report = fxpasses.rewrite(gm)
    assert report.matches == {"add_rms_norm_linear": 1, "linear": 1}
    targets = _targets(gm)
    assert targets.count("fxp.add_rms_norm_linear.default") == 1 and "aten.rsqrt.default" not in targets
    args = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    assert torch.equal(gm(*args), _residual_block(*args))  # on CPU the fused op is the same ops: bit for bit


# ---- GPU ------------------------------------------------------------------------------------------------------
def _ref_err(out, x, w, b=None):
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    return ((out.double() - ref).norm() / ref.norm()).item()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 17, 32])
@pytest.mark.parametrize("n,k", [(2048, 2048), (1000, 300), (24, 4104)])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_kernels_match_float64_and_cublas(dtype, m, n, k, bias):
    from fxpasses.ops import triton_linear

    x, w = rand(m, k, dtype=dtype, device="cuda"), rand(n, k, dtype=dtype, seed=1, device="cuda") * 0.05
    b = rand(n, dtype=dtype, seed=2, device="cuda") if bias else None
    cublas = F.linear(x, w, b)
    configs = [triton_linear.default_config(m, n, k), triton_linear.Config(16 if m <= 16 else 32, 16, 128, 4, 3)]
    if m == 1:
        configs.append(triton_linear.Config(1, 4, 256, 2, 1))
    elif m <= 8:
        configs.append(triton_linear.Config(1 << (m - 1).bit_length(), 2, 512, 4, 1))
    for config in configs:
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # poisoned: every element must be written
        triton_linear.launch(x, w, b, config, out=out)
        assert _ref_err(out, x, w, b) < 5e-3, config
        torch.testing.assert_close(out, cublas, rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@gpu
@needs_cuda
def test_op_on_cuda_picks_per_size_and_replays_in_a_cuda_graph():
    from fxpasses.ops import triton_linear

    n, k = 2048, 2048
    w = rand(n, k, seed=1, device="cuda") * 0.05
    for m in (1, 8, 32, 33, 512):
        x = rand(m, k, seed=m, device="cuda")
        out = fxp.linear(x, w)
        assert _ref_err(out, x, w) < 5e-3
        if triton_linear.choose(m, n, k) is None:
            assert torch.equal(out, F.linear(x, w))  # cuBLAS, bit for bit
    x = rand(1, k, device="cuda")
    static = x.clone()
    g = torch.cuda.CUDAGraph()
    fxp.linear(static, w)
    with torch.cuda.graph(g):
        out = fxp.linear(static, w)
    for seed in (5, 6):
        new = rand(1, k, seed=seed, device="cuda")
        static.copy_(new)
        g.replay()
        torch.testing.assert_close(out, fxp.linear(new, w), rtol=0, atol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(3072, 2048), (1000, 300), (6144, 4096)])
def test_add_norm_gemv_kernel_equals_the_unfused_ops(dtype, n, k):
    from fxpasses.ops import triton_linear

    x, r = rand(1, k, dtype=dtype, device="cuda"), rand(1, k, dtype=dtype, seed=1, device="cuda")
    nw = (1 + 0.1 * rand(k, dtype=torch.float32, seed=2)).to(dtype).cuda()
    w = rand(n, k, dtype=dtype, seed=3, device="cuda") * 0.05
    normed, h_ref = fxp.add_rms_norm(x, r, nw, 1e-5)
    for block_n in (1, 4, 8):
        y, h = triton_linear.launch_add_norm(x, r, nw, 1e-5, w, block_n, 8 if k > 2048 else 4)
        assert torch.equal(h, h_ref)
        assert _ref_err(y, normed, w) < 5e-3
        torch.testing.assert_close(y, F.linear(normed, w), rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)
    # the normalized row itself equals the norm kernel's: through an identity projection it comes out unchanged
    eye = torch.eye(k, dtype=dtype, device="cuda")
    assert torch.equal(triton_linear.launch_add_norm(x, r, nw, 1e-5, eye, 4, 4)[0], normed)
    # the op: fused where triton_linear.FUSED_SHAPES lists the shape (at one token), else the two unfused ops
    y, h = fxp.add_rms_norm_linear(x, r, nw, 1e-5, w)
    assert torch.equal(h, h_ref) and _ref_err(y, normed, w) < 5e-3
    y8, h8 = fxp.add_rms_norm_linear(x.expand(8, k).contiguous(), r.expand(8, k).contiguous(), nw, 1e-5, w)
    assert torch.equal(y8[3], fxp.linear(normed.expand(8, k).contiguous(), w)[3]) and torch.equal(h8[5], h_ref[0])


@gpu
@needs_cuda
def test_compiled_llama_with_full_cuda_graphs_uses_fxp_linear_and_equals_eager():
    from fxpasses.models import LlamaConfig, build_model, make_steps, run_steps

    config = dataclasses.replace(LlamaConfig(), dtype=torch.bfloat16)
    steps = [dataclasses.replace(b, **{k: getattr(b, k).cuda() for k in ("input_ids", "position_ids", "slot_ids")})
             for b in make_steps(config.vocab_size)]
    expected = run_steps(build_model("llama", config).cuda(), steps)
    model = build_model("llama", config).cuda()
    backend = fxpasses.Backend(cuda_graph_sizes=[1, 2, 4, 8], splitting_ops=())
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    # per graph: the first layer's qkv (after a plain rms_norm), o and down of every layer are linear; every other
    # qkv, every gate_up and the LM head follow an add + RMSNorm: add_rms_norm_linear
    matches, layers = backend.report.matches, config.num_layers
    graphs = matches["linear"] // (2 * layers + 1)
    assert graphs >= 1 and matches["linear"] == graphs * (2 * layers + 1)
    assert matches["add_rms_norm_linear"] == graphs * 2 * layers and "add_rms_norm" not in matches
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("op, args, moved", [
    ("linear", ("x", "weight"), "weight"),
    ("linear", ("x", "weight", "bias"), "bias"),
    ("add_rms_norm_linear", ("x", "residual", "norm_weight", 1e-6, "weight"), "weight"),
    ("add_rms_norm_linear", ("x", "residual", "norm_weight", 1e-6, "weight"), "norm_weight"),
])
def test_a_weight_on_another_device_is_refused(op, args, moved):
    """A CPU input with a meta weight dispatches to the fake kernel: uninitialized memory, unless refused."""
    tensors = {"x": torch.randn(3, 8), "residual": torch.randn(3, 8), "norm_weight": torch.rand(8) + 0.5,
               "weight": torch.randn(5, 8), "bias": torch.randn(5)}
    tensors[moved] = tensors[moved].to("meta")
    call = [tensors[a] if isinstance(a, str) else a for a in args]
    with pytest.raises(ValueError, match=rf"fxp\.{op}: argument '{moved}' is on device meta but 'x' is on cpu"):
        getattr(torch.ops.fxp, op)(*call)
