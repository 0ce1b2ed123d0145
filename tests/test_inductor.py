"""The Inductor path: our pipeline runs as Inductor's post-grad pass and its uuid drives the FX-graph cache.

Inductor compiles cost ~20 s each on CPU, so this module is small and marked slow.
"""
import pytest
import torch

import fxpasses
from fxpasses import compat
from test_backend import double_to_add

pytestmark = pytest.mark.slow


def f(x, w):
    return torch.relu(x @ w) * 2 + 1


def compile_and_check(backend):
    torch._dynamo.reset()
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    with torch.no_grad():
        got = torch.compile(f, backend=backend)(x, w)
    torch.testing.assert_close(got, f(x, w))


def test_inductor_runs_pipeline_and_cache_key_follows_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    first = fxpasses.Backend(inductor=True, patterns=[double_to_add])
    hits0, misses0 = compat.fx_graph_cache_counters()
    compile_and_check(first)
    hits1, misses1 = compat.fx_graph_cache_counters()
    assert (hits1 - hits0, misses1 - misses0) == (0, 1)
    assert first.report.matches == {"double_to_add": 1}
    names = [r.name for r in first.report.passes]
    assert "patterns/double_to_add" in names and not any(n.startswith("defunctionalize") for n in names)

    same = fxpasses.Backend(inductor=True, patterns=[double_to_add])
    compile_and_check(same)
    hits2, misses2 = compat.fx_graph_cache_counters()
    assert (hits2 - hits1, misses2 - misses1) == (1, 0)  # identical configuration: served from the cache
    assert any("served from Inductor's FX graph cache" in n for n in same.report.notes)

    other_mapping = fxpasses.Backend(fxpasses.Mapping(2, 1, 2, 1), inductor=True, patterns=[double_to_add])
    compile_and_check(other_mapping)
    hits3, misses3 = compat.fx_graph_cache_counters()
    assert (hits3 - hits2, misses3 - misses2) == (0, 1)  # a different Mapping must not reuse the cached graph
    assert other_mapping.report.matches == {"double_to_add": 1}


def p2p(x):
    buf = torch.empty_like(x)
    torch.ops.fxp.pp_recv(buf, 1, "0")
    y = x * 2 + buf
    torch.ops.fxp.pp_send(y * 3, 1, "0")  # never read again
    return y


def test_inductor_keeps_sends_and_receives_v1(tmp_path, monkeypatch):
    from fxpasses.testing import fake_process_group
    from pattern_helpers import compile_and_capture

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cached graph would skip the passes
    with fake_process_group(2, 0), compat.set_auto_functionalized_v2(False):
        out, backend, _, seen = compile_and_capture(p2p, (torch.ones(4),), inductor=True)
    assert seen["auto_functionalized(fxp.pp_send)"] == 1 and seen["auto_functionalized(fxp.pp_recv)"] == 1
    assert out.shape == (4,) and not backend.report.errors


def test_patterns_fuse_on_the_inductor_path(tmp_path, monkeypatch):
    """Inductor decomposes the graph (e.g. ``.float()`` becomes ``prims.convert_element_type``) before our pass
    sees it; an Inductor Backend's patterns are traced with the same decomposition table."""
    import dataclasses

    from fxpasses.models import LlamaConfig, build_model, make_steps, run_steps

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    config = dataclasses.replace(LlamaConfig(), num_layers=2, dtype=torch.bfloat16)
    steps = make_steps(config.vocab_size, decode_steps=1)
    expected = run_steps(build_model("llama", config), steps)
    model = build_model("llama", config)
    backend = fxpasses.Backend(inductor=True)
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    assert backend.report.matches == config.predicted_matches(fxpasses.Mapping(), inductor=True)
    assert backend.report.near_misses == []
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=5e-2, atol=5e-2)


def test_inductor_config_is_applied_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = {}

    def spy(gm, ctx):
        from torch._inductor import config

        seen["fallback_random"] = config.fallback_random
        from fxpasses.passes import PassResult

        return PassResult()

    compile_and_check(fxpasses.Backend(inductor=True, inductor_config={"fallback_random": True}, extra_passes=[spy]))
    assert seen == {"fallback_random": True}  # the option is in force while our passes (inside Inductor) run
    with pytest.raises(ValueError, match=r"unknown Inductor option\(s\) \['triton.cudagraph'\]"):
        fxpasses.Backend(inductor=True, inductor_config={"triton.cudagraph": True})
    with pytest.raises(ValueError, match="inductor_config is for the Inductor path; pass inductor=True too"):
        fxpasses.Backend(inductor_config={"triton.cudagraphs": True})
