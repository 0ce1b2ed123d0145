"""The decode fusions on transformers-style N-D activations: ``F.linear`` on ``[batch, seq, hidden]`` is
``view -> mm -> view`` after AOT, and the linear patterns match through those views (``patterns/linear.py``).

CPU, through real ``torch.compile`` and the fxpasses Backend: the patterns are for CUDA tensors, so the models are
compiled on *fake* CUDA tensors (no GPU needed); the graph the pipeline produced is then run on real CPU tensors,
where every fused op is its composition, and must equal eager bit for bit. transformers' own models index tensors
in Python (``x[..., :half]``), which a CPU-only torch cannot run on fake CUDA tensors, so a real
``LlamaForCausalLM`` is compiled on the CPU, its AOT graph moved to (fake) CUDA by its device arguments and
rewritten with ``fxpasses.rewrite``. GPU (marked): a transformers-shaped model (nn.Linear on [B, S, H], transformers'
RMSNorm) in bf16 on CUDA, with and without full CUDA graphs, against eager.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

import fxpasses
from fxpasses.testing import RecordingBackend
from pattern_helpers import aot_graph_on_cpu, fake_cuda, point_graph_at

fxp = torch.ops.fxp
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FUSED_OPS = ("fxp.rms_norm_linear", "fxp.add_rms_norm_linear", "fxp.linear_silu_mul",
             "fxp.add_rms_norm_linear_silu_mul")


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, as it is written there."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Block(nn.Module):
    """A transformers-shaped decoder step on [B, S, H]: input norm into a projection (the first layer's qkv), the
    residual add and post-attention norm into separate gate_proj / up_proj with SiLU-and-mul, the final add and
    norm into the LM head. ``fused_gate_up``: one gate_up projection split by ``chunk`` (Phi-3's spelling)."""

    def __init__(self, hidden: int = 16, inter: int = 24, vocab: int = 40, fused_gate_up: bool = False):
        super().__init__()
        self.input_norm, self.post_norm, self.final_norm = RMSNorm(hidden), RMSNorm(hidden), RMSNorm(hidden)
        self.q_proj, self.o_proj = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=True)
        self.fused_gate_up = fused_gate_up
        if fused_gate_up:
            self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        else:
            self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():  # norm weights away from 1, so a wrong rounding would show
            for norm in (self.input_norm, self.post_norm, self.final_norm):
                norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = x + self.o_proj(torch.tanh(self.q_proj(self.input_norm(x))))
        n = self.post_norm(h)
        if self.fused_gate_up:
            gate, up = self.gate_up_proj(n).chunk(2, dim=-1)
            act = F.silu(gate) * up
        else:
            act = F.silu(self.gate_proj(n)) * self.up_proj(n)
        h = h + self.down_proj(act)
        return self.lm_head(self.final_norm(h))


BLOCK_MATCHES = {"rms_norm_linear": 1, "linear_bias": 1, "add_rms_norm_linear_silu_mul": 1, "linear": 1,
                 "add_rms_norm_linear": 1}


def compile_on_fake_cuda(model: nn.Module, *inputs: torch.Tensor, **backend_kwargs):
    """Compile ``model`` with a recording fxpasses Backend on fake CUDA copies of its parameters and ``inputs``;
    run the graph the pipeline produced on the real CPU tensors. Returns (that output, eager's, backend)."""
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    backend = RecordingBackend(**backend_kwargs)
    torch._dynamo.reset()
    with torch.no_grad(), FakeTensorMode():
        fake = {k: fake_cuda(v) for k, v in params.items()}
        torch.compile(lambda p, *xs: functional_call(model, p, xs), backend=backend)(fake, *map(fake_cuda, inputs))
    assert len(backend.records) == 1, "one graph"
    # Dynamo lifted the parameters and inputs into graph inputs in this order
    with torch.no_grad():
        got = backend.records[0].module(*params.values(), *inputs)
        want = model(*inputs)
    got = tuple(got) if isinstance(want, tuple) else got[0]
    return got, want, backend


def same(got, want) -> bool:
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    return len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3), (1, 1), (3, 1)], ids=["batch2xseq3", "decode1x1", "decode3x1"])
def test_transformers_shaped_block_fuses_and_is_bit_identical(dtype, shape):
    torch.manual_seed(0)
    model = Block().to(dtype).eval()
    x = rand(*shape, 16, dtype=dtype)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert backend.report.matches == BLOCK_MATCHES
    assert backend.report.near_misses == []
    after = backend.after
    for op in FUSED_OPS:
        if op != "fxp.linear_silu_mul":
            assert after[op] == 1, (op, after)
    # the views around every projection went with it: no matmul and no flattening view is left
    assert after["fxp.linear"] == 2 and not any(k in after for k in ("aten.mm", "aten.addmm", "aten.t"))
    assert "aten.view" not in after and "aten._unsafe_view" not in after, after
    # the fused ops take the N-D activation itself
    code = backend.records[0].code_after
    for node in backend.records[0].module.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("fxp."):
            assert node.args[0].meta["val"].dim() == 3, (node.format_node(), code)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_gate_up_split_by_chunk(dtype):
    torch.manual_seed(1)
    model = Block(fused_gate_up=True).to(dtype).eval()
    x = rand(2, 3, 16, dtype=dtype, seed=1)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert backend.report.matches == BLOCK_MATCHES
    assert backend.after["fxp.add_rms_norm_linear_silu_mul"] == 1 and "aten.split" not in backend.after
    assert torch.equal(got, want)


class Mlp(nn.Module):
    """transformers' LlamaMLP alone (no norm before it): linear_silu_mul of two 3-D projections."""

    def __init__(self, hidden=16, inter=24, read_gate=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.read_gate = read_gate

    def forward(self, x):
        gate = self.gate_proj(x)
        out = self.down_proj(F.silu(gate) * self.up_proj(x))
        return (out, gate) if self.read_gate else out


def test_swiglu_of_two_3d_projections():
    torch.manual_seed(2)
    model = Mlp().to(torch.bfloat16).eval()
    x = rand(2, 3, 16, dtype=torch.bfloat16, seed=2)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert backend.report.matches == {"linear_silu_mul": 1, "linear": 1}
    assert backend.after["fxp.linear_silu_mul"] == 1 and "aten.silu" not in backend.after
    assert torch.equal(got, want)


def test_swiglu_whose_gate_is_read_elsewhere_is_not_fused():
    torch.manual_seed(2)
    model = Mlp(read_gate=True).to(torch.bfloat16).eval()
    x = rand(2, 3, 16, dtype=torch.bfloat16, seed=2)
    got, want, backend = compile_on_fake_cuda(model, x)
    # each projection alone (3-D, views folded), the activation alone
    assert backend.report.matches == {"linear": 3, "silu_and_mul": 1}
    assert "fxp.linear_silu_mul" not in backend.after
    assert same(got, want)


class GateUpReadTwice(nn.Module):
    """One gate_up projection split by chunk whose gate half is also returned: the split carries the near miss."""

    def __init__(self, hidden=16, inter=24):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up), gate


def test_swiglu_halves_whose_gate_is_read_elsewhere_are_explained():
    torch.manual_seed(4)
    model = GateUpReadTwice().to(torch.bfloat16).eval()
    x = rand(2, 3, 16, dtype=torch.bfloat16, seed=5)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert backend.report.matches == {"linear": 2, "silu_and_mul": 1}
    misses = [str(m) for m in backend.report.near_misses]
    assert len(misses) == 1 and "linear_silu_mul did not apply" in misses[0] and "another user" in misses[0], misses
    assert same(got, want)


class NormReadTwice(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.norm, self.proj = RMSNorm(hidden), nn.Linear(hidden, 8, bias=False)

    def forward(self, x):
        n = self.norm(x)
        return self.proj(n), n


def test_norm_whose_output_is_read_elsewhere_is_not_fused_into_the_projection():
    model = NormReadTwice().to(torch.bfloat16).eval()
    x = rand(2, 3, 16, dtype=torch.bfloat16, seed=3)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert backend.report.matches == {"rms_norm": 1, "linear": 1}
    assert "fxp.rms_norm_linear" not in backend.after
    assert same(got, want)


# ---- views that must not be folded ---------------------------------------------------------------------------
class Transposed(nn.Module):
    """[S, B, H] transposed to [B, S, H] before the projection: F.linear of a non-contiguous activation."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.proj(x.transpose(0, 1))


class Regrouped(nn.Module):
    """The product flattened from [2, 3] and viewed back as [3, 2]: the rows would form other batches."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return F.linear(x.view(-1, 16), self.proj.weight).view(3, 2, 8)


class LastDimChanged(nn.Module):
    """[2, 3, 16] viewed as [3, 32] and projected: the product does not act on the activation's last dim."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.proj(x.reshape(3, 32)).view(3, 1, 8)


class FlattenReadTwice(nn.Module):
    """The flattening view is also an output: the projection still takes the 3-D activation (the view stays)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        flat = x.view(-1, 16)
        return F.linear(flat, self.proj.weight).view(2, 3, 8), flat


class ProductReadTwice(nn.Module):
    """The 2-D product is viewed back to [2, 3, 8] and also summed: the views cannot go (the product is needed)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        y = F.linear(x.view(-1, 16), self.proj.weight)
        return y.view(2, 3, 8), y.sum()


EDGE_CASES = {  # name: (model, input shape, matches, near-miss substring or None, ops after that must be there)
    "transposed": (Transposed, (3, 2, 16), {}, "traced as a batched matmul", ("aten.bmm",)),
    "regrouped": (Regrouped, (2, 3, 16), {"linear": 1},
                  "reshaped to (3, 2, 8), not viewed back to the activation's leading dims", ("aten.view",)),
    "last_dim_changed": (LastDimChanged, (2, 3, 16), {"linear": 1}, "changes the last dim", ("aten.view",)),
    "flatten_read_twice": (FlattenReadTwice, (2, 3, 16), {"linear": 1}, None, ("aten.view",)),
    "product_read_twice": (ProductReadTwice, (2, 3, 16), {"linear": 1}, "the 2-D product is also read by sum",
                           ("aten.view",)),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_views_that_change_the_meaning_are_not_folded(case):
    cls, shape, matches, near, kept = EDGE_CASES[case]
    torch.manual_seed(3)
    model = cls().to(torch.bfloat16).eval()
    x = rand(*shape, dtype=torch.bfloat16, seed=4)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert backend.report.matches == matches
    misses = [str(m) for m in backend.report.near_misses]
    assert (any(near in m for m in misses) if near else misses == []), misses
    for op in kept:
        assert op in backend.after, (op, backend.after)
    for node in backend.records[0].module.graph.nodes:  # a 2-D product where the views could not be folded
        if node.target is fxp.linear.default:
            want_dim = 3 if case == "flatten_read_twice" else 2
            assert node.args[0].meta["val"].dim() == want_dim, node.format_node()
    assert same(got, want)


def test_cpu_graphs_are_left_alone():
    """On CPU tensors fxp.linear is F.linear itself: nothing is replaced, nothing is reported."""
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16).eval()
    x = rand(2, 3, 16, dtype=torch.bfloat16)
    backend = RecordingBackend()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
        assert torch.equal(got, model(x))
    assert not set(backend.report.matches) & {"linear", "linear_bias", "rms_norm_linear", "add_rms_norm_linear",
                                              "linear_silu_mul", "add_rms_norm_linear_silu_mul"}
    assert backend.report.near_misses == []


# ---- property: any leading shape, either dtype, with and without bias ----------------------------------------
@settings(max_examples=int(os.environ.get("FXPASSES_HYPOTHESIS_EXAMPLES", "4")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_property_a_linear_on_any_leading_shape_takes_the_activation(lead, bias, dtype, seed):
    torch.manual_seed(seed)
    model = nn.Linear(8, 5, bias=bias).to(dtype).eval()
    x = rand(*lead, 8, dtype=dtype, seed=seed)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert backend.report.matches == {"linear_bias" if bias else "linear": 1}
    assert backend.after["fxp.linear"] == 1 and not any(
        k in backend.after for k in ("aten.mm", "aten.addmm", "aten.view", "aten._unsafe_view"))
    assert torch.equal(got, want)


@settings(max_examples=int(os.environ.get("FXPASSES_HYPOTHESIS_EXAMPLES", "3")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), fused_gate_up=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_property_a_decoder_step_on_any_leading_shape_fuses_bit_identically(lead, fused_gate_up, dtype, seed):
    torch.manual_seed(seed)
    model = Block(fused_gate_up=fused_gate_up).to(dtype).eval()
    x = rand(*lead, 16, dtype=dtype, seed=seed)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert backend.report.matches == BLOCK_MATCHES and backend.report.near_misses == []
    assert torch.equal(got, want)


# ---- real transformers decoders --------------------------------------------------------------------------------
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
# per 2 layers, on CUDA: each layer's post-attention add + norm + gate_proj/up_proj + SiLU-and-mul in one op; the
# final add + norm into the LM head; q, k, v, o, down stay fxp.linear (q, k, v read one norm: it fuses alone)
LLAMA_CUDA = {"add_rms_norm_linear_silu_mul": 2, "add_rms_norm_linear": 1, "linear": 10, "add_rms_norm": 1,
              "rms_norm": 1, "rotary_embedding": 4}
# name -> (config class, model class, config overrides, expected matches on CUDA, near-miss reason or None)
DECODERS = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", {}, LLAMA_CUDA, None),
    "Mistral": ("MistralConfig", "MistralForCausalLM", {}, LLAMA_CUDA, None),
    # q, k, v with biases
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {**LLAMA_CUDA, "linear": 4, "linear_bias": 6}, None),
    # one qkv projection (the norm fuses into it) and one gate_up split by chunk
    "Phi3": ("Phi3Config", "Phi3ForCausalLM", {}, {"rms_norm_linear": 1, "add_rms_norm_linear": 2,
                                                   "add_rms_norm_linear_silu_mul": 2, "linear": 4,
                                                   "rotary_embedding": 4}, None),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, {**LLAMA_CUDA, "rms_norm": 5}, None),
    # x * (1 + w) is not RMSNorm's weight and GeGLU is not SiLU: the projections alone (and RoPE)
    "Gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}, {"linear": 15, "rotary_embedding": 4},
              "the weight is computed"),
    "GPTNeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.25, "num_key_value_heads": None},
                {"linear": 1, "linear_bias": 8, "rotary_embedding": 4}, None),
}
DECODER_CASES = [("Llama", torch.float32)] + [(name, torch.bfloat16) for name in DECODERS]


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", DECODER_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in DECODER_CASES])
def test_transformers_decoders_fuse_on_cuda_and_are_bit_identical(name, dtype):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, overrides, expected, near = DECODERS[name]
    kwargs = {k: v for k, v in {**COMMON, **overrides}.items() if v is not None}
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).to(dtype).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    gm, real_inputs, compiled = aot_graph_on_cpu(lambda i: model(i, use_cache=False).logits, ids)
    assert torch.equal(compiled, eager)
    point_graph_at(gm, "cuda")
    with FakeTensorMode():
        fakes = [fake_cuda(t) for t in real_inputs]
    gm, report = fxpasses.rewrite(gm, example_inputs=fakes)
    assert report.matches == expected
    misses = [m.reason for m in report.near_misses]
    assert (misses and all(near in m for m in misses)) if near else misses == [], misses
    ops = fxpasses.testing.count_ops(gm)
    for op in ("add_rms_norm_linear_silu_mul", "add_rms_norm_linear", "rms_norm_linear"):
        assert ops[f"fxp.{op}"] == expected.get(op, 0)
    # every projection took the [2, 7, K] activation: no matmul, no transposed weight is left
    assert not any(k in ops for k in ("aten.mm", "aten.addmm", "aten.t", "aten.bmm")), ops
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(("fxp.linear", "fxp.add_rms_norm_linear",
                                                                        "fxp.rms_norm_linear")):
            assert node.args[0].meta["val"].shape[:2] == (2, 7), node.format_node()
    point_graph_at(gm, "cpu")  # on CPU tensors every fused op is its composition: bit for bit
    with torch.no_grad():
        (got,) = gm(*real_inputs)
    assert torch.equal(got, eager)


# ---- GPU ------------------------------------------------------------------------------------------------------
def _gpu_block(fused_gate_up=False):
    torch.manual_seed(0)
    return Block(hidden=256, inter=512, vocab=512, fused_gate_up=fused_gate_up).to(torch.bfloat16).cuda().eval()


@gpu
@needs_cuda
@pytest.mark.parametrize("fused_gate_up", [False, True], ids=["gate_proj_up_proj", "gate_up_chunk"])
@pytest.mark.parametrize("shape", [(2, 3), (1, 1), (4, 1)])
def test_gpu_transformers_shaped_block_fuses_and_equals_eager(shape, fused_gate_up):
    model = _gpu_block(fused_gate_up)
    x = torch.randn(*shape, 256, device="cuda").to(torch.bfloat16)
    backend = RecordingBackend()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
        want = model(x)
    assert backend.report.matches == BLOCK_MATCHES
    for op in ("fxp.rms_norm_linear", "fxp.add_rms_norm_linear", "fxp.add_rms_norm_linear_silu_mul"):
        assert backend.after[op] == 1, backend.after
    assert "aten.mm" not in backend.after and "aten._unsafe_view" not in backend.after
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


@gpu
@needs_cuda
def test_gpu_decode_steps_in_full_cuda_graphs_equal_eager():
    """Decode steps [B, 1, H] (B = 1, 2, 3: the first dim, marked as the token dim, is what the graphs are
    captured for; 3 is padded to 4) in full CUDA graphs with the fused ops, against eager, replayed twice."""
    model = _gpu_block()
    backend = RecordingBackend(cuda_graph_sizes=[1, 2, 4], splitting_ops=())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.inference_mode():
        for step, b in enumerate((1, 2, 3, 1, 2, 3)):
            x = torch.randn(b, 1, 256, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16).cuda()
            fxpasses.mark_token_dim(x)
            got, want = compiled(x), model(x)
            torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    assert set(backend.report.matches) == set(BLOCK_MATCHES), backend.report.matches
    for record in backend.records:
        assert record.after["fxp.add_rms_norm_linear_silu_mul"] == 1 and "aten.mm" not in record.after
