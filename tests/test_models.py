"""Reference models: single-process compile, bad layouts, and per-rank structure for world size 8 under the fake
process group (every TP x PP split)."""
import dataclasses

import pytest
import torch

import fxpasses
from fxpasses.models import DeepSeekConfig, LlamaConfig, build_model, make_steps, run_steps
from fxpasses.testing import fake_process_group

CONFIGS = {"llama": LlamaConfig, "deepseek": DeepSeekConfig}


@pytest.mark.parametrize("name", ["llama", "deepseek"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_process_compile_equals_eager_with_one_graph(name, dtype):
    config = dataclasses.replace(CONFIGS[name](), dtype=dtype)
    steps = make_steps(config.vocab_size, decode_steps=3)
    expected = run_steps(build_model(name, config), steps)
    model = build_model(name, config)
    backend = fxpasses.Backend()
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    assert backend.report.graphs == 1  # one compile serves the prefill (8 tokens) and decode (2 tokens)
    assert backend.token_dim.source == "L['input_ids']" and backend.token_dim.is_dynamic
    assert backend.report.matches == config.predicted_matches(fxpasses.Mapping())
    for g, e in zip(got, expected):
        assert torch.equal(g, e)  # tp=1: the fused ops compute exactly what the model does


@pytest.mark.parametrize("name, kwargs, mapping, message", [
    ("llama", dict(num_layers=2), fxpasses.Mapping(4, 0, 1, 4), "2 layers cannot be split over 4 pipeline stages"),
    ("llama", dict(num_heads=6), fxpasses.Mapping(4, 0, 4, 1), r"num_heads \(6\) is not divisible by tp_size \(4\)"),
    ("llama", dict(num_heads=12, num_kv_heads=3), fxpasses.Mapping(4, 0, 4, 1), r"num_kv_heads \(3\) is below tp_size \(4\) and does not divide it"),
    ("deepseek", dict(num_experts=6), fxpasses.Mapping(4, 0, 4, 1), r"num_experts \(6\) is not divisible by tp_size \(4\)"),
    ("deepseek", dict(num_layers=3), fxpasses.Mapping(8, 0, 1, 8), "3 layers cannot be split over 8 pipeline stages"),
])
def test_bad_layouts_fail_early(name, kwargs, mapping, message):
    config = dataclasses.replace(CONFIGS[name](), **kwargs)
    with pytest.raises(ValueError, match=message):
        build_model(name, config, mapping)


def test_build_needs_process_groups_for_parallel_layouts():
    with pytest.raises(RuntimeError, match="call fxpasses.init_process_groups"):
        build_model("llama", None, fxpasses.Mapping(2, 0, 2, 1))
    with pytest.raises(ValueError, match="unknown model 'gpt'"):
        build_model("gpt")


def test_cli_rejects_bad_layouts(capsys):
    from fxpasses.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "--tp", "3", "--pp", "1"])
    assert info.value.code == 2
    assert "num_heads (4) is not divisible by tp_size (3)" in capsys.readouterr().err


SPLITS = [(8, 1), (4, 2), (2, 4), (1, 8)]


def compile_rank_structure(name, tp, pp, rank):
    """Compile one rank's stage under the fake process group; return (fused counts, predicted counts)."""
    wide = dict(num_kv_heads=8) if name == "llama" else dict(num_experts=8)  # divisible by tp up to 8
    # one layer per stage (at least two in all): every stage role (first, middle, last; with and without a
    # previous all_reduce) is there, at a fraction of the compile time
    config = dataclasses.replace(CONFIGS[name](), num_layers=max(2, pp), num_heads=8, **wide)
    mapping = fxpasses.Mapping(world_size=8, rank=rank, tp_size=tp, pp_size=pp)
    with fake_process_group(8, rank):
        fxpasses.init_process_groups(mapping)
        model = build_model(name, config, mapping)
        backend = fxpasses.Backend(mapping)
        torch._dynamo.reset()
        run_steps(model, make_steps(config.vocab_size, decode_steps=0), torch.compile(model, backend=backend))
    assert not backend.report.errors
    return backend.report.matches, config.predicted_matches(mapping)


@pytest.mark.parametrize("tp, pp", SPLITS, ids=[f"tp{t}pp{p}" for t, p in SPLITS])
def test_world8_llama_every_rank_fuses_as_predicted(tp, pp):
    for rank in range(8):
        got, predicted = compile_rank_structure("llama", tp, pp, rank)
        assert got == predicted, (rank, got, predicted)
        assert ("allreduce_add_rms_norm" in got) == (tp > 1)


@pytest.mark.parametrize("tp, pp", SPLITS, ids=[f"tp{t}pp{p}" for t, p in SPLITS])
def test_world8_deepseek_stage_roles_fuse_as_predicted(tp, pp):
    # ranks of one stage compile the same graph; check the first and last stage and one tp_rank > 0
    for rank in sorted({0, tp - 1, 8 - tp, 7}):
        got, predicted = compile_rank_structure("deepseek", tp, pp, rank)
        assert got == predicted, (rank, got, predicted)
