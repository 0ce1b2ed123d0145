"""rms_norm and add_rms_norm: every spelling, both operand orders, dtypes, near misses, and real transformers Llama."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpasses
from fxpasses import patterns
from pattern_helpers import BF16_TOL, compile_and_capture

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: BF16_TOL, torch.float16: dict(rtol=2e-3, atol=2e-3)}


def hf_norm(x, w, eps):
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


SPELLINGS = {
    "transformers": hf_norm,
    "weight_last": lambda x, w, eps: (lambda h: (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w)(x.float()),
    "no_upcast": lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w,
    "functional": lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps),
}


class Norm(torch.nn.Module):
    def __init__(self, spelling, d, dtype, eps=1e-6):
        super().__init__()
        self.spelling, self.eps = spelling, eps
        self.weight = torch.nn.Parameter(torch.rand(d, dtype=dtype) + 0.5)

    def forward(self, x):
        return SPELLINGS[self.spelling](x, self.weight, self.eps)


class AddNorm(torch.nn.Module):
    def __init__(self, d, dtype, residual_first=False, eps=1e-6):
        super().__init__()
        self.residual_first, self.eps = residual_first, eps
        self.weight = torch.nn.Parameter(torch.rand(d, dtype=dtype) + 0.5)

    def forward(self, x, residual):
        r = residual + x if self.residual_first else x + residual
        return hf_norm(r, self.weight, self.eps), r


def data(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_rms_norm_every_spelling(spelling, dtype):
    model = Norm(spelling, 32, dtype).eval()
    x = data(4, 5, 32, dtype=dtype)
    out, backend, before, after = compile_and_capture(model, (x,))
    if dtype != torch.float32 and spelling in ("no_upcast", "functional"):
        # these round elsewhere than the fused op (transformers' order) in low precision: fusing would change
        # numbers, so the norm is left as written and the near miss says why
        assert backend.report.matches == {} and "fxp.rms_norm" not in after
        (miss,) = backend.report.near_misses
        assert miss.pattern == "rms_norm" and "not fused" in miss.reason
        assert ("float32 upcast" if spelling == "no_upcast" else "rounds once") in miss.reason
        with torch.no_grad():
            assert torch.equal(out, model(x))
        return
    assert backend.report.matches == {"rms_norm": 1}
    assert before["aten.rsqrt"] == 1 and "aten.rsqrt" not in after and after["fxp.rms_norm"] == 1
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), **TOL[dtype])
    if spelling == "transformers":  # our op computes exactly what transformers computes
        with torch.no_grad():
            assert torch.equal(out, model(x))


@pytest.mark.parametrize("residual_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_both_operand_orders(dtype, residual_first):
    model = AddNorm(48, dtype, residual_first).eval()
    x, r = data(6, 48, dtype=dtype), data(6, 48, dtype=dtype, seed=1)
    (out, res), backend, before, after = compile_and_capture(model, (x, r))
    assert backend.report.matches == {"add_rms_norm": 1}
    assert after["fxp.add_rms_norm"] == 1 and "aten.add.Tensor" not in after and "aten.rsqrt" not in after
    with torch.no_grad():
        ref_out, ref_res = model(x, r)
    assert torch.equal(res, ref_res) and torch.equal(out, ref_out)


class GemmaNorm(torch.nn.Module):
    """Gemma's RMSNorm multiplies by (1 + weight) in float32: not plain RMSNorm."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norm_is_not_rewritten(dtype):
    model = GemmaNorm(32).to(dtype).eval()
    x = data(3, 32, dtype=dtype)
    out, backend, before, after = compile_and_capture(model, (x,))
    assert backend.report.matches == {}
    assert "fxp.rms_norm" not in after and after["aten.rsqrt"] == 1
    with torch.no_grad():
        assert torch.equal(out, model(x))  # exact: nothing was rewritten
    (miss,) = backend.report.near_misses
    assert miss.pattern == "rms_norm"
    if dtype == torch.float32:  # structurally it is an RMSNorm times a computed weight
        assert "the weight is computed" in miss.reason and "Gemma" in miss.reason


@settings(max_examples=int(os.environ.get("FXPASSES_PROPERTY_EXAMPLES", "16")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    hidden=st.integers(1, 40),
    eps=st.floats(1e-8, 1e-1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    spelling=st.sampled_from(list(SPELLINGS)),
    with_add=st.booleans(),
)
def test_property_shapes_eps_dtypes(shape, hidden, eps, dtype, spelling, with_add):
    d = hidden
    if with_add:
        model = AddNorm(d, dtype, eps=eps).eval()
        args = (data(*shape, d, dtype=dtype), data(*shape, d, dtype=dtype, seed=1))
        expected = {"add_rms_norm": 1}
    else:
        model = Norm(spelling, d, dtype, eps=eps).eval()
        args = (data(*shape, d, dtype=dtype),)
        # spellings that round elsewhere than the fused op are left alone in low precision (see test above)
        rounds_elsewhere = dtype != torch.float32 and spelling in ("no_upcast", "functional")
        expected = {} if rounds_elsewhere else {"rms_norm": 1}
    out, backend, _, after = compile_and_capture(model, args)
    assert backend.report.matches == expected
    with torch.no_grad():
        if not expected or with_add or spelling == "transformers":
            torch.testing.assert_close(out, model(*args), rtol=0, atol=0)  # nothing rewritten, or the op's order
        else:
            torch.testing.assert_close(out, model(*args), **TOL[dtype])
    node = next(n for n in backend.report.passes if n.name == "patterns/pattern_rewrites")
    assert not node.error


def test_pp_only_mapping_still_fuses_add_rms_norm():
    from fxpasses.testing import fake_process_group

    m = fxpasses.Mapping(world_size=4, rank=2, tp_size=1, pp_size=4)
    model = AddNorm(16, torch.bfloat16).eval()
    with fake_process_group(4, 2):
        fxpasses.init_process_groups(m)
        _, backend, _, after = compile_and_capture(model, (data(3, 16, dtype=torch.bfloat16),) * 2, mapping=m)
    assert backend.report.matches == {"add_rms_norm": 1} and after["fxp.add_rms_norm"] == 1


# ---- near misses, one per reason ------------------------------------------------------------------------------
def test_near_miss_intermediate_with_another_user():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            v = x.pow(2).mean(-1, keepdim=True) + 1e-6
            return x * torch.rsqrt(v) * self.weight, v * 2  # the add's output is used outside the norm

    out, backend, _, after = compile_and_capture(Leaky().eval(), (data(2, 8),))
    assert backend.report.matches == {} and after["aten.rsqrt"] == 1
    (miss,) = backend.report.near_misses
    assert miss.node == "rsqrt" and miss.pattern == "rms_norm"
    assert "the output of aten.add" in miss.reason and "has another user" in miss.reason


def test_near_miss_epsilon_lifted_to_graph_input():
    model = Norm("transformers", 8, torch.float32, eps=1e-5).eval()
    _, backend, _, _ = compile_and_capture(model, (data(3, 8),), dynamic=True)
    assert backend.report.matches == {}
    (miss,) = backend.report.near_misses
    assert "epsilon was lifted to a graph input (set torch._dynamo.config.specialize_float=True" in miss.reason


def test_near_miss_dtype_not_registered():
    model = Norm("transformers", 8, torch.float64).eval()
    out, backend, _, _ = compile_and_capture(model, (data(3, 8, dtype=torch.float64),))
    assert backend.report.matches == {}
    (miss,) = backend.report.near_misses
    assert "dtype torch.float64 is not registered" in miss.reason
    with torch.no_grad():
        assert torch.equal(out, model(data(3, 8, dtype=torch.float64)))
    assert "near miss: rsqrt: rms_norm did not apply: dtype torch.float64" in str(backend.report)


def test_registry_lists_patterns_by_benefit_and_refuses_duplicates():
    names = [p.name for p in patterns.all()]
    assert names == ["allreduce_add_rms_norm_quant_fp8", "allreduce_add_rms_norm", "add_rms_norm_linear_silu_mul",
                     "add_rms_norm_linear", "add_rms_norm_quant_fp8", "add_rms_norm", "rms_norm_quant_fp8",
                     "rms_norm_linear", "rope_attention", "rms_norm", "rotary_embedding", "linear_silu_mul",
                     "quant_fp8", "silu_and_mul", "linear_bias", "linear"]
    benefits = [p.benefit for p in patterns.all()]
    assert benefits == sorted(benefits, reverse=True)
    with pytest.raises(ValueError, match="a pattern named 'rms_norm' is already registered"):
        patterns.register(patterns.get("rms_norm"))
    with pytest.raises(KeyError, match="no pattern named 'nope'"):
        patterns.get("nope")


def test_patterns_by_name_and_subsets():
    model = AddNorm(16, torch.float32).eval()
    args = (data(3, 16), data(3, 16, seed=1))
    _, only_norm, _, after = compile_and_capture(model, args, patterns=["rms_norm"])
    assert only_norm.report.matches == {"rms_norm": 1} and after["aten.add.Tensor"] == 1
    _, none, _, _ = compile_and_capture(model, args, patterns=[])
    assert none.report.matches == {}


# ---- a real model nobody here wrote ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_llama(dtype):
    transformers = pytest.importorskip("transformers")
    layers = 3
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, 128, (2, 7))
    out, backend, before, after = compile_and_capture(model, (ids,))
    # plus transformers' RoPE (rotate_half by slicing, in the model dtype) on q and k, and its SwiGLU activation
    assert backend.report.matches == {"add_rms_norm": 2 * layers, "rms_norm": 1, "rotary_embedding": 2 * layers,
                                      "silu_and_mul": layers}
    assert before["aten.rsqrt"] == 2 * layers + 1 and "aten.rsqrt" not in after
    assert after["fxp.add_rms_norm"] == 2 * layers and after["fxp.rms_norm"] == 1
    assert backend.report.near_misses == []
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out.logits, ref, **TOL[dtype])
