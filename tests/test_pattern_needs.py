"""``Pattern.needs``: a pattern whose every match implies a fact about the whole graph (a CUDA tensor, a float8
value, a call of fxp.attention) is traced and searched only for graphs that have the fact. That must change
nothing but time: on a graph without the fact the rewritten graph, its matches, its near misses and its numbers
equal those of the same patterns with ``needs`` off; on a graph with it the pattern is traced when that graph
arrives, inside the compile, and fuses as before."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_linear_3d import BLOCK_MATCHES, Block, compile_on_fake_cuda, rand, same

from fxpasses import patterns
from fxpasses.models import LlamaConfig, build_model
from fxpasses.testing import RecordingBackend

CUDA_ONLY = {"linear", "linear_bias", "linear_silu_mul", "rms_norm_linear", "add_rms_norm_linear",
             "add_rms_norm_linear_silu_mul"}
FP8 = {"quant_fp8", "rms_norm_quant_fp8", "add_rms_norm_quant_fp8", "allreduce_add_rms_norm_quant_fp8"}


def test_the_patterns_that_need_something_of_the_graph():
    needy = {p.name: p.needs.__doc__ for p in patterns.all() if p.needs is not None}
    assert set(needy) == CUDA_ONLY | FP8 | {"rope_attention"}
    assert all(needy.values()), "every needs says what it needs"


def _compile(model, inputs, pattern_list=None):
    backend = RecordingBackend(cache=False, **({} if pattern_list is None else {"patterns": pattern_list}))
    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(model, backend=backend)(*inputs)
    return out, backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_cpu_llama_compiles_as_with_needs_off(dtype):
    """Our reference Llama on CPU (attention through fxp.attention): the CUDA-only and fp8 patterns are never traced,
    and the result is the one every pattern, searched everywhere, gives."""
    config = dataclasses.replace(LlamaConfig(max_slots=8), dtype=dtype)
    model = build_model("llama", config)
    inputs = (torch.randint(0, config.vocab_size, (4,), generator=torch.Generator().manual_seed(0)),
              torch.arange(4), torch.arange(4))
    with torch.inference_mode():
        want = copy.deepcopy(model)(*inputs)
    got, backend = _compile(copy.deepcopy(model), inputs)
    every, backend_all = _compile(copy.deepcopy(model), inputs,
                                  [dataclasses.replace(p, needs=None) for p in patterns.all()])

    traced = set(backend.patterns[0].pattern_set.variants)
    assert not traced & (CUDA_ONLY | FP8), traced
    assert "rope_attention" in traced  # the graph calls fxp.attention (functionalized)
    assert backend.report.matches == backend_all.report.matches
    assert backend.report.matches["rope_attention"] > 0
    assert [str(m) for m in backend.report.near_misses] == [str(m) for m in backend_all.report.near_misses]
    assert backend.records[0].code_after == backend_all.records[0].code_after
    assert torch.equal(got, want) and torch.equal(every, want)
    assert backend.pattern_setup_seconds < backend_all.pattern_setup_seconds


def test_a_cuda_graph_traces_the_projection_patterns_when_it_arrives():
    """A Backend made without a graph traces no CUDA-only pattern; its first (fake) CUDA graph has them traced
    inside that compile, and they fuse as they always did, bit-identical on CPU."""
    assert not CUDA_ONLY & set(RecordingBackend(cache=False).patterns[0].pattern_set.variants)
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16).eval()
    x = rand(2, 3, 16, dtype=torch.bfloat16, seed=1)
    got, want, backend = compile_on_fake_cuda(model, x)
    assert CUDA_ONLY <= set(backend.patterns[0].pattern_set.variants)
    assert backend.report.matches == BLOCK_MATCHES
    assert same(got, want)
