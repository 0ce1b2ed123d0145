"""fxp.linear and the fused projection ops (RMSNorm prologue, SiLU-and-mul epilogue): ops, CPU references, Triton
kernels on CUDA, and their patterns.

CPU: the ops are their compositions bit for bit; bad input gets errors naming the argument; the patterns replace
what AOT makes of the compositions in graphs of CUDA tensors (traced with fake tensors, so no GPU is needed, and
run on CPU tensors afterwards: the rewritten graph computes exactly what the original did), refuse where a value
has another reader (with a near miss), and leave CPU graphs and the Inductor path alone; a real Llama layer fuses
as ``LlamaConfig.predicted_matches(cuda=True)`` counts. Triton's interpreter (where Triton is installed: run with
``PYTHONPATH=<site with triton>``) checks the fused kernel's prologue and epilogue on CPU. GPU (marked): the
kernels against a float64 reference, cuBLAS and the unfused kernels at Llama and odd shapes, inside a CUDA graph,
and compiled Llamas with full CUDA graphs equal to eager and to the unfused path.
"""
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fxpasses
from fxpasses import patterns
from fxpasses.patterns import rms_norm_spellings
from fxpasses.patterns.linear import FUSED_PATTERNS
from fxpasses.passes import PipelineConfig
from fxpasses.testing import fake_process_group
from pattern_helpers import needs_triton, run_under_triton_interpreter

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


# ---- the fused ops on CPU: their compositions, bit for bit ----------------------------------------------------
def _swiglu(y, up=None):
    gate, up = (y.split([y.shape[-1] // 2] * 2, dim=-1) if up is None else (y, up))
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 3, 64)])
def test_cpu_fused_ops_are_their_compositions_bit_for_bit(dtype, shape):
    x, r = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=1)
    nw, w, wu = rand(64, dtype=dtype, seed=2), rand(48, 64, dtype=dtype, seed=3), rand(24, 64, dtype=dtype, seed=4)
    normed, h_ref = fxp.add_rms_norm(x, r, nw, 1e-5)
    # concatenated [gate; up] and two separate weights, each against the eager ops it replaces
    assert torch.equal(fxp.linear_silu_mul(x, w), _swiglu(F.linear(x, w)))
    assert torch.equal(fxp.linear_silu_mul(x, w[:24], wu), F.silu(F.linear(x, w[:24])) * F.linear(x, wu))
    assert torch.equal(fxp.linear_silu_mul(x, w), fxp.silu_and_mul(*F.linear(x, w).split([24, 24], dim=-1)))
    y, h = fxp.add_rms_norm_linear_silu_mul(x, r, nw, 1e-5, w)
    assert torch.equal(h, h_ref) and torch.equal(y, _swiglu(F.linear(normed, w)))
    y, h = fxp.add_rms_norm_linear_silu_mul(x, r, nw, 1e-5, w[:24], wu)
    assert torch.equal(h, h_ref) and torch.equal(y, _swiglu(F.linear(normed, w[:24]), F.linear(normed, wu)))
    assert torch.equal(fxp.rms_norm_linear(x, nw, 1e-5, w), F.linear(fxp.rms_norm(x, nw, 1e-5), w))
    meta = [t.to("meta") for t in (x, r, nw, w)]
    assert fxp.linear_silu_mul(meta[0], meta[3]).shape == (*shape[:-1], 24)
    out, h = fxp.add_rms_norm_linear_silu_mul(*meta[:3], 1e-5, meta[3])
    assert out.shape == (*shape[:-1], 24) and h.shape == shape and out.dtype == dtype
    assert fxp.rms_norm_linear(meta[0], meta[2], 1e-5, meta[3]).shape == (*shape[:-1], 48)


@pytest.mark.parametrize("call,message", [
    (lambda: fxp.linear_silu_mul(rand(2, 8), rand(5, 8)), "weight has 5 rows; with no up_weight it must be"),
    (lambda: fxp.linear_silu_mul(rand(2, 8), rand(4, 8), rand(3, 8)), r"up_weight is \(3, 8\) but the gate weight"),
    (lambda: fxp.linear_silu_mul(rand(2, 8), rand(4, 8), rand(4, 8, dtype=torch.float16)), "up_weight is torch.float16"),
    (lambda: fxp.linear_silu_mul(rand(2, 8), rand(4, 9)), r"linear_silu_mul: x \(2, 8\) must end in in_features"),
    (lambda: fxp.linear_silu_mul(rand(2, 8), rand(4, 8).to(torch.int32)), "argument 'weight' has dtype torch.int32"),
    (lambda: fxp.add_rms_norm_linear_silu_mul(rand(2, 8), rand(2, 7), rand(8), 1e-5, rand(4, 8)), "residual is"),
    (lambda: fxp.add_rms_norm_linear_silu_mul(rand(2, 8), rand(2, 8), rand(8), 1e-5, rand(4, 8), rand(2, 8)),
     "up_weight is"),
    (lambda: fxp.rms_norm_linear(rand(2, 8), rand(7), 1e-5, rand(4, 8)), "weight has shape"),
    (lambda: fxp.rms_norm_linear(rand(2, 8), rand(8), 1e-5, rand(4, 6)), "rms_norm_linear: x"),
])
def test_fused_ops_name_the_bad_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- the fused patterns, on graphs of (fake) CUDA tensors ----------------------------------------------------
def _mlp_block(x, r, nw, wgu, wd):
    """Post-attention half of a Llama layer: residual add, RMSNorm, gate_up split in halves, SiLU-and-mul, down."""
    h = x + r
    gate, up = F.linear(rms_norm_spellings()[0](h, nw, 1e-5), wgu).split([32, 32], dim=-1)
    return F.linear(F.silu(gate) * up, wd) + h


def _mlp_block_chunk(x, r, nw, wgu, wd):
    h = x + r
    gate, up = F.linear(rms_norm_spellings()[1](h, nw, 1e-5), wgu).chunk(2, dim=-1)
    return F.linear(up * F.silu(gate), wd) + h


def _hf_mlp(x, nw, wg, wu, wd):
    """transformers' LlamaMLP after a plain RMSNorm: separate gate and up projections (no residual add here)."""
    n = rms_norm_spellings()[0](x, nw, 1e-5)
    return F.linear(F.silu(F.linear(n, wg)) * F.linear(n, wu), wd)


def _hf_mlp_residual(x, r, nw, wg, wu, wd):
    h = x + r
    n = rms_norm_spellings()[1](h, nw, 1e-5)
    return F.linear(F.silu(F.linear(n, wg)) * F.linear(n, wu), wd), h


def _gate_read_twice(x, wgu, wd):
    gate, up = F.linear(x, wgu).split([32, 32], dim=-1)
    return F.linear(F.silu(gate) * up, wd), gate


def _product_read_twice(x, wgu, wd):
    y = F.linear(x, wgu)
    gate, up = y.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, wd), y.sum()


def _norm_read_twice(x, r, nw, wgu, wd):
    h = x + r
    n = rms_norm_spellings()[0](h, nw, 1e-5)
    gate, up = F.linear(n, wgu).split([32, 32], dim=-1)
    return F.linear(F.silu(gate) * up, wd) + h, n


def _halves_swapped(x, wgu, wd):
    up, gate = F.linear(x, wgu).split([32, 32], dim=-1)  # silu of the second half: not [gate; up]
    return F.linear(F.silu(gate) * up, wd)


def _rewritten(fn, shapes, device="cuda"):
    with FakeTensorMode():
        gm = make_fx(fn, tracing_mode="fake")(*[torch.empty(*s, device=device, dtype=torch.bfloat16) for s in shapes])
    return fxpasses.rewrite(gm)


def _same(got, want):
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    return len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


H, I2 = (2, 16), (64, 16)  # x [tokens, hidden], gate_up [2I, hidden] with I = 32
CASES = {  # name: (fn, input shapes, expected matches, expected near-miss substring or None)
    "split": (_mlp_block, [H, H, (16,), I2, (16, 32)], {"add_rms_norm_linear_silu_mul": 1, "linear": 1}, None),
    "chunk": (_mlp_block_chunk, [H, H, (16,), I2, (16, 32)], {"add_rms_norm_linear_silu_mul": 1, "linear": 1}, None),
    "hf": (_hf_mlp, [H, (16,), (32, 16), (32, 16), (16, 32)], {"rms_norm": 1, "linear_silu_mul": 1, "linear": 1}, None),
    "hf_residual": (_hf_mlp_residual, [H, H, (16,), (32, 16), (32, 16), (16, 32)],
                    {"add_rms_norm_linear_silu_mul": 1, "linear": 1}, None),
    "gate_read_twice": (_gate_read_twice, [H, I2, (16, 32)], {"linear": 2, "silu_and_mul": 1},
                        "the output of getitem (getitem) has another user (output)"),
    "product_read_twice": (_product_read_twice, [H, I2, (16, 32)], {"linear": 2, "silu_and_mul": 1},
                           "has another user (sum"),
    "norm_read_twice": (_norm_read_twice, [H, H, (16,), I2, (16, 32)],
                        {"add_rms_norm": 1, "linear_silu_mul": 1, "linear": 1}, None),
    "halves_swapped": (_halves_swapped, [H, I2, (16, 32)], {"linear": 2, "silu_and_mul": 1}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_swiglu_patterns_fuse_only_where_safe_and_compute_the_same(case):
    fn, shapes, expected, near = CASES[case]
    gm, report = _rewritten(fn, shapes)
    assert report.matches == expected
    misses = [str(m) for m in report.near_misses]
    assert (any(near in m for m in misses) if near else misses == []), misses
    targets = _targets(gm)
    fused = sum(t in ("fxp.linear_silu_mul.default", "fxp.add_rms_norm_linear_silu_mul.default") for t in targets)
    assert fused == expected.get("linear_silu_mul", 0) + expected.get("add_rms_norm_linear_silu_mul", 0)
    if fused:
        assert "aten.silu.default" not in targets and "fxp.silu_and_mul.default" not in targets
    # the graph carries no device: on CPU tensors the fused ops are their compositions, so bit for bit
    args = [rand(*s, seed=i) * (0.2 if len(s) == 2 and s[0] > 2 else 1) for i, s in enumerate(shapes)]
    assert _same(gm(*args), fn(*args))


def test_swiglu_patterns_leave_cpu_graphs_alone_without_near_misses():
    _, report = _rewritten(_mlp_block, [H, H, (16,), I2, (16, 32)], device="cpu")
    assert report.matches == {"add_rms_norm": 1, "silu_and_mul": 1} and report.near_misses == []
    for name in ("linear_silu_mul", "add_rms_norm_linear_silu_mul", "rms_norm_linear"):
        p = patterns.get(name)
        assert p.applies(fxpasses.Mapping(), PipelineConfig(defunctionalize=True))
        assert not p.applies(fxpasses.Mapping(), PipelineConfig(defunctionalize=False))  # the Inductor path


def test_rms_norm_linear_pattern():
    def first_layer(x, nw, w, w2):
        return F.linear(torch.relu(F.linear(rms_norm_spellings()[1](x, nw, 1e-5), w)), w2)

    shapes = [H, (16,), (32, 16), (8, 32)]
    gm, report = _rewritten(first_layer, shapes)
    assert report.matches == {"rms_norm_linear": 1, "linear": 1}
    args = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    assert torch.equal(gm(*args), first_layer(*args))


def _layer_matches(tp: int, first: bool) -> dict[str, int]:
    """One real Llama decoder layer (rank 0 of ``tp``), traced on fake CUDA tensors, through the registry."""
    from torch.func import functional_call

    from fxpasses.mapping import cached_process_groups
    from fxpasses.models import LlamaConfig, build_model

    config = dataclasses.replace(LlamaConfig(), dtype=torch.bfloat16, num_layers=1)
    mapping = fxpasses.Mapping(world_size=tp, rank=0, tp_size=tp)
    with fake_process_group(tp, 0):
        if tp > 1:
            fxpasses.init_process_groups(mapping)
        layer = build_model("llama", config, mapping).layers[0]
        state = dict(itertools.chain(layer.named_parameters(), layer.named_buffers()))
        with FakeTensorMode():
            fake = {k: torch.empty(v.shape, dtype=v.dtype, device="cuda") for k, v in state.items()}
            hidden = torch.empty(1, config.hidden_size, dtype=torch.bfloat16, device="cuda")
            ids = torch.zeros(1, dtype=torch.long, device="cuda")
            rope = torch.empty(1, 1, config.head_dim, dtype=torch.float32, device="cuda")

            def step(params, hidden, residual, ids, cos, sin):
                return functional_call(layer, params, (hidden, residual, ids, ids, (cos, sin)))

            gm = make_fx(step, tracing_mode="fake")(fake, hidden, None if first else hidden.clone(), ids, rope,
                                                    rope.clone())
        groups = cached_process_groups(mapping)
        ctx = patterns.MatchContext(mapping, PipelineConfig(), groups.tp.group_name if groups else None)
        counts = patterns.PatternSet(patterns.all(), mapping, PipelineConfig()).apply(gm, ctx).counts
    return {k: v for k, v in counts.items() if "rotary" not in k and "rope" not in k}  # the attention side's own


@pytest.mark.parametrize("tp", [1, 2])
def test_a_llama_layer_on_cuda_fuses_every_norm_and_the_activation(tp):
    """What predicted_matches(cuda=True) counts per layer: the first layer's plain norm into qkv, a later
    layer's add + norm into qkv (after the previous down projection's all_reduce under TP), the post-attention
    add + norm + gate_up + SiLU-and-mul into one op; o and down stay linear."""
    common = {"add_rms_norm_linear_silu_mul": 1, "linear": 2}
    assert _layer_matches(tp, first=True) == {"rms_norm_linear": 1, **common}
    assert _layer_matches(tp, first=False) == {"add_rms_norm_linear": 1, **common}


def test_fused_patterns_are_registered():
    assert {p.name for p in patterns.all()} >= set(FUSED_PATTERNS)


def test_predicted_matches_on_cuda_count_every_stage_role():
    from fxpasses.models import LlamaConfig

    config = LlamaConfig(num_layers=4)
    one = config.predicted_matches(fxpasses.Mapping(), cuda=True)
    rope = {"rotary_embedding": 8, "rope_attention": 4}  # the attention side's (RoPE folded into fxp.attention)
    assert one == {"rms_norm_linear": 1, "add_rms_norm_linear": 4, "add_rms_norm_linear_silu_mul": 4, "linear": 8,
                   **rope}
    assert config.predicted_matches(fxpasses.Mapping(2, 0, 2, 1), cuda=True) == one  # TP: the same ops per rank
    first, last = (config.predicted_matches(fxpasses.Mapping(2, r, 1, 2), cuda=True) for r in (0, 1))
    rope = {"rotary_embedding": 4, "rope_attention": 2}
    assert first == {"rms_norm_linear": 1, "add_rms_norm_linear": 1, "add_rms_norm_linear_silu_mul": 2, "linear": 4,
                     **rope}
    assert last == {"add_rms_norm_linear": 3, "add_rms_norm_linear_silu_mul": 2, "linear": 4, **rope}


# ---- Triton's interpreter (CPU): the fused kernel's prologue and epilogue ---------------------------------------
def interpreter_checks() -> None:
    """Run by the test below in a process with TRITON_INTERPRET=1 (the interpreter must be on when the kernels are
    defined). The interpreter casts float32 to bfloat16 by truncation, not rounding, so the exact checks are the
    ones whose roundings the kernel makes itself (round_as) or in float16 (rounded like torch)."""
    from fxpasses.ops import triton_linear as tl_lin

    persistent = tl_lin.Config(1, 1, 64, 1, 1, programs=1)  # 4 programs (off CUDA) walking 24 column blocks
    for dtype, (n, k), config in [(torch.float16, (13, 37), tl_lin.Config(1, 4, 16, 1, 1)),
                                  (torch.bfloat16, (10, 100), tl_lin.Config(1, 8, 64, 2, 1)),
                                  (torch.float16, (24, 64), persistent),  # the row normalized once, in registers
                                  (torch.float16, (24, 50), tl_lin.Config(1, 2, 16, 1, 1, programs=1))]:
        x, r = rand(1, k, dtype=dtype), rand(1, k, dtype=dtype, seed=1)
        nw = (1 + 0.1 * rand(k, dtype=torch.float32, seed=2)).to(dtype)
        gate, up = (rand(n, k, dtype=dtype, seed=s) * 0.1 for s in (3, 4))
        normed, h_ref = fxp.add_rms_norm(x, r, nw, 1e-5)
        eye = torch.eye(k, dtype=dtype)
        # the normalized row through an identity projection: exactly fxp.add_rms_norm's / fxp.rms_norm's
        y, h = tl_lin.launch_fused(x, eye, config, norm_weight=nw, eps=1e-5, residual=r)
        assert torch.equal(h, h_ref) and torch.equal(y, normed), (dtype, n, k)
        assert torch.equal(tl_lin.launch_fused(x, eye, config, norm_weight=nw, eps=1e-5)[0], fxp.rms_norm(x, nw, 1e-5))
        # the epilogue: silu(gate) * up of the products the same tile computes, as fxp.silu_and_mul rounds it
        for prologue in ({}, {"norm_weight": nw, "eps": 1e-5, "residual": r}):
            g, u = (tl_lin.launch_fused(x, w, config, out=torch.empty(1, n), **prologue)[0].to(dtype)
                    for w in (gate, up))
            y, _ = tl_lin.launch_fused(x, gate, config, up_weight=up, **prologue)
            want = fxp.silu_and_mul(g, u)
            if dtype == torch.float16:
                assert torch.equal(y, want), (prologue.keys(), n, k)
            else:  # the final store truncates here: within one bf16 step
                torch.testing.assert_close(y, want, rtol=2 ** -7, atol=1e-6)
            ref = F.silu(F.linear(normed if prologue else x, gate, None).double()) * F.linear(
                normed if prologue else x, up).double()
            assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2


@needs_triton
def test_fused_kernel_under_triton_interpreter():
    run_under_triton_interpreter("tests.test_linear")


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
@pytest.mark.parametrize("n,k,dtype", [(3072, 2048, torch.bfloat16), (3072, 2048, torch.float16),
                                       (8192, 2048, torch.bfloat16), (1000, 300, torch.float16),
                                       (7168, 4096, torch.bfloat16), (37, 4104, torch.bfloat16)])
def test_fused_gemv_kernel_equals_the_unfused_kernels(n, k, dtype):
    """Prologue and epilogue against the kernels they replace, at 1B/8B shapes (qkv; gate_up's halves; 8B gate_up
    at TP 4) and odd ones (N not a multiple of the tile, K not a multiple of 16), with one program per column
    block and with persistent grids."""
    import triton

    from fxpasses.ops import triton_linear

    x, r = rand(1, k, dtype=dtype, device="cuda"), rand(1, k, dtype=dtype, seed=1, device="cuda")
    nw = (1 + 0.1 * rand(k, dtype=torch.float32, seed=2)).to(dtype).cuda()
    gate, up = (rand(n, k, dtype=dtype, seed=s, device="cuda") * 0.05 for s in (3, 4))
    normed, h_ref = fxp.add_rms_norm(x, r, nw, 1e-5)
    eye = torch.eye(k, dtype=dtype, device="cuda")
    configs = {triton_linear.fused_config(1, n, k, silu_mul=False), triton_linear.fused_config(1, n, k, silu_mul=True),
               triton_linear.Config(1, 1, 256, 2, 1),
               # persistent grids: the whole row in one step (normalized once per program), and K in steps
               triton_linear.Config(1, 2, triton.next_power_of_2(k), 8, 2, programs=4),
               triton_linear.Config(1, 2, 1024, 4, 1, programs=2)} - {None}
    assert len(configs) >= 4
    for c in configs:
        poisoned = torch.full((1, n), float("nan"), dtype=dtype, device="cuda")  # every element must be written
        y, h = triton_linear.launch_fused(x, gate, c, norm_weight=nw, eps=1e-5, residual=r, out=poisoned)
        assert torch.equal(h, h_ref), c  # the residual sum: elementwise, bit for bit
        assert _ref_err(y, normed, gate) < 5e-3, c
        torch.testing.assert_close(y, F.linear(normed, gate), rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)
        # the normalized row itself, through an identity projection: the norm kernel's, up to the float32 sum of
        # squares (summed in another order with other warps: at most one step of the dtype, rarely)
        row = triton_linear.launch_fused(x, eye, c, norm_weight=nw, eps=1e-5, residual=r)[0]
        assert (row != normed).float().mean().item() < 0.01, c
        torch.testing.assert_close(row, normed, rtol=2 ** -7, atol=0)
        row = triton_linear.launch_fused(x, eye, c, norm_weight=nw, eps=1e-5)[0]
        torch.testing.assert_close(row, fxp.rms_norm(x, nw, 1e-5), rtol=2 ** -7, atol=0)
        # the epilogue: exactly fxp.silu_and_mul's kernel on the products the same tile computes
        for prologue in ({}, {"norm_weight": nw, "eps": 1e-5, "residual": r}):
            g, u = (triton_linear.launch_fused(x, w, c, **prologue)[0] for w in (gate, up))
            y, _ = triton_linear.launch_fused(x, gate, c, up_weight=up, **prologue)
            assert torch.equal(y, fxp.silu_and_mul(g, u)), (c, list(prologue))
            a = normed if prologue else x
            eager = F.silu(F.linear(a, gate)) * F.linear(a, up)
            torch.testing.assert_close(y, eager, rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_ops_pick_the_fused_kernel_at_one_token_and_replay_in_a_cuda_graph(dtype):
    """1B shapes, as the measured policy chooses: SiLU-and-mul fused into gate_up at one token (within GEMM
    tolerance of the unfused kernels); the norm prologue not fused there (measured slower: the norm kernel, then
    the projection, bit for bit); at 8 tokens, and in float32, the unfused kernels themselves, bit for bit;
    captured in a CUDA graph, replays equal fresh calls. The one-pass norm prologue on qkv at one token (measured
    faster: NORM_ONE_PASS), within GEMM tolerance. Then the norm prologue where it is on (8B qkv at TP 2)."""
    from fxpasses.ops import triton_linear

    k, i = 2048, 8192
    nw = (1 + 0.1 * rand(k, dtype=torch.float32, seed=2)).to(dtype).cuda()
    wqkv = rand(3072, k, dtype=dtype, seed=3, device="cuda") * 0.05
    wgu = rand(2 * i, k, dtype=dtype, seed=4, device="cuda") * 0.05
    lin, silu = fxp.linear, fxp.silu_and_mul
    assert triton_linear.fused_config(1, 3072, k, silu_mul=False, norm=True).one_pass  # NORM_ONE_PASS: measured faster
    assert triton_linear.fused_config(1, i, k, silu_mul=True, norm=True) is None
    tol = dict(rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)
    for m in (1, 8):
        x, r = rand(m, k, dtype=dtype, seed=m, device="cuda"), rand(m, k, dtype=dtype, seed=m + 1, device="cuda")
        normed, h_ref = fxp.add_rms_norm(x, r, nw, 1e-5)
        fused = m == 1 and dtype != torch.float32
        assert (triton_linear.fused_config(m, i, k, silu_mul=True) is not None) == (m == 1)
        # the norm ops at one token: the one-pass prologue (rounds the normalized row once, not twice: within GEMM
        # tolerance of the norm kernel then the projection); else those two kernels, bit for bit. The residual sum
        # is eager's add either way.
        y, h = fxp.add_rms_norm_linear(x, r, nw, 1e-5, wqkv)
        for got, want in ((fxp.rms_norm_linear(x, nw, 1e-5, wqkv), lin(fxp.rms_norm(x, nw, 1e-5), wqkv)),
                          (y, lin(normed, wqkv))):
            if fused:
                torch.testing.assert_close(got, want, **tol)
            else:
                assert torch.equal(got, want)
        assert torch.equal(h, h_ref)
        # SiLU-and-mul: fused at one token (within tolerance), else the unfused kernels
        unfused = silu(*lin(x, wgu).split([i, i], dim=-1))
        got = fxp.linear_silu_mul(x, wgu)
        if fused:
            torch.testing.assert_close(got, unfused, **tol)
        else:
            assert torch.equal(got, unfused)
        # with the norm: the norm kernel, then linear_silu_mul (fused or not by its own choice), bit for bit
        y, h = fxp.add_rms_norm_linear_silu_mul(x, r, nw, 1e-5, wgu)
        assert torch.equal(y, fxp.linear_silu_mul(normed, wgu)) and torch.equal(h, h_ref)
        torch.testing.assert_close(y, silu(*lin(normed, wgu).split([i, i], dim=-1)), **tol)
    # where the norm prologue is on (8B qkv at TP 2: [3072, 4096]): one kernel, within tolerance, h bit for bit
    k8 = 4096
    x, r = rand(1, k8, dtype=dtype, seed=7, device="cuda"), rand(1, k8, dtype=dtype, seed=8, device="cuda")
    nw8 = (1 + 0.1 * rand(k8, dtype=torch.float32, seed=2)).to(dtype).cuda()
    w8 = rand(3072, k8, dtype=dtype, seed=3, device="cuda") * 0.05
    assert triton_linear.fused_config(1, 3072, k8, silu_mul=False, norm=True) is not None  # (float32: unfused)
    normed, h_ref = fxp.add_rms_norm(x, r, nw8, 1e-5)
    y, h = fxp.add_rms_norm_linear(x, r, nw8, 1e-5, w8)
    assert torch.equal(h, h_ref) and _ref_err(y, normed, w8) < 5e-3
    torch.testing.assert_close(y, F.linear(normed, w8), **tol)
    # two separate weights (transformers' gate_proj / up_proj): the same numbers as the concatenated one
    x = rand(1, k, dtype=dtype, device="cuda")
    pair, concatenated = fxp.linear_silu_mul(x, wgu[:i], wgu[i:]), fxp.linear_silu_mul(x, wgu)
    if dtype == torch.float32:  # cuBLAS: products of 8192 and of 16384 columns may sum in different orders
        torch.testing.assert_close(pair, concatenated)
    else:  # one fused launch either way
        assert torch.equal(pair, concatenated)
    static_x, static_r = rand(1, k, dtype=dtype, device="cuda"), rand(1, k, dtype=dtype, seed=9, device="cuda")
    fxp.add_rms_norm_linear_silu_mul(static_x, static_r, nw, 1e-5, wgu)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, h = fxp.add_rms_norm_linear_silu_mul(static_x, static_r, nw, 1e-5, wgu)
    for seed in (5, 6):
        new_x, new_r = rand(1, k, dtype=dtype, seed=seed, device="cuda"), rand(1, k, dtype=dtype, seed=seed + 10,
                                                                               device="cuda")
        static_x.copy_(new_x)
        static_r.copy_(new_r)
        graph.replay()
        want = fxp.add_rms_norm_linear_silu_mul(new_x, new_r, nw, 1e-5, wgu)
        assert torch.equal(out, want[0]) and torch.equal(h, want[1])


def _cuda_steps(config, **kw):
    from fxpasses.models import make_steps

    return [dataclasses.replace(b, **{k: getattr(b, k).cuda() for k in ("input_ids", "position_ids", "slot_ids")})
            for b in make_steps(config.vocab_size, **kw)]


@gpu
@needs_cuda
def test_compiled_llama_with_full_cuda_graphs_uses_the_fused_ops_and_equals_eager():
    from fxpasses.models import LlamaConfig, build_model, run_steps

    config = dataclasses.replace(LlamaConfig(), dtype=torch.bfloat16)
    steps = _cuda_steps(config) + _cuda_steps(config, prompt_lens=(4,), decode_steps=3)  # 2-token, then 1-token decode
    expected = run_steps(build_model("llama", config).cuda(), steps)
    model = build_model("llama", config).cuda()
    backend = fxpasses.Backend(cuda_graph_sizes=[1, 2, 4, 8], splitting_ops=())
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    predicted = config.predicted_matches(fxpasses.Mapping(), cuda=True)
    graphs = backend.report.matches["linear"] // predicted["linear"]
    assert graphs >= 1 and backend.report.matches == {k: graphs * v for k, v in predicted.items()}
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=5e-2, atol=5e-2)


@gpu
@needs_cuda
def test_llama_1b_shaped_layers_fused_equal_unfused_and_eager():
    """Two layers of Llama-3.2-1B's shapes (small vocabulary), bf16, 1-token decode steps in full CUDA graphs:
    the fused ops (norms in qkv / gate_up GEMVs, SiLU-and-mul in gate_up's) against the same Backend without
    the fused patterns, and against eager."""
    from fxpasses.models import LlamaConfig, build_model, run_steps

    config = LlamaConfig.llama_3_2_1b(num_layers=2, vocab_size=1024, dtype=torch.bfloat16, max_len=64)
    steps = _cuda_steps(config, prompt_lens=(6,), decode_steps=4)  # one sequence: 1-token decode steps
    expected = run_steps(build_model("llama", config).cuda(), steps)
    results = {}
    for name, chosen in (("fused", None), ("unfused", [p for p in patterns.all() if p.name not in FUSED_PATTERNS])):
        model = build_model("llama", config).cuda()
        backend = fxpasses.Backend(cuda_graph_sizes=[1, 2, 4, 8], splitting_ops=(), patterns=chosen)
        torch._dynamo.reset()
        results[name] = (run_steps(model, steps, torch.compile(model, backend=backend)), backend.report.matches)
    assert not set(FUSED_PATTERNS) & set(results["unfused"][1])
    assert results["fused"][1]["add_rms_norm_linear_silu_mul"] >= 2
    for f, u, e in zip(results["fused"][0], results["unfused"][0], expected):
        torch.testing.assert_close(f.float(), u.float(), rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(f.float(), e.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("op, args, moved", [
    ("linear", ("x", "weight"), "weight"),
    ("linear", ("x", "weight", "bias"), "bias"),
    ("add_rms_norm_linear", ("x", "residual", "norm_weight", 1e-6, "weight"), "weight"),
    ("add_rms_norm_linear", ("x", "residual", "norm_weight", 1e-6, "weight"), "norm_weight"),
    ("rms_norm_linear", ("x", "norm_weight", 1e-6, "weight"), "weight"),
    ("linear_silu_mul", ("x", "weight"), "weight"),
    ("linear_silu_mul", ("x", "weight", "up_weight"), "up_weight"),
    ("add_rms_norm_linear_silu_mul", ("x", "residual", "norm_weight", 1e-6, "weight", "up_weight"), "up_weight"),
])
def test_a_weight_on_another_device_is_refused(op, args, moved):
    """A CPU input with a meta weight dispatches to the fake kernel: uninitialized memory, unless refused."""
    tensors = {"x": torch.randn(3, 8), "residual": torch.randn(3, 8), "norm_weight": torch.rand(8) + 0.5,
               "weight": torch.randn(6, 8), "bias": torch.randn(6), "up_weight": torch.randn(6, 8)}
    tensors[moved] = tensors[moved].to("meta")
    call = [tensors[a] if isinstance(a, str) else a for a in args]
    with pytest.raises(ValueError, match=rf"fxp\.{op}: argument '{moved}' is on device meta but 'x' is on cpu"):
        getattr(torch.ops.fxp, op)(*call)
