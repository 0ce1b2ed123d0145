"""End to end on real gloo ranks: each rank compiles its stage with fxpasses; logits equal a single-process eager
model with the same weights for a prefill and 4 decode steps; the fusions are exactly those predicted per rank."""
import pytest
import torch

from fxpasses.demo import compare, make_config, reference_logits, run_rank
from fxpasses.testing import RankPool

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


@pytest.fixture(scope="module")
def pool4():
    with RankPool(4, timeout=300) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool2():
    with RankPool(2, timeout=300) as pool:
        yield pool


def check(pool, model, tp, pp, dtype=torch.float32, layers=4):
    config = make_config(model, layers, dtype)
    results = pool.run(run_rank, model, tp, pp, config, 4)
    assert compare(results, reference_logits(model, config, 4), dtype) == []
    for r in results:
        assert r.errors == [], r.errors
        assert r.graphs == 1, f"rank {r.rank} compiled {r.graphs} graphs; one must serve prefill and decode"
        assert r.matches == r.predicted, (r.rank, r.matches, r.predicted)
        assert ("allreduce_add_rms_norm" in r.matches) == (tp > 1)
    assert sum(r.logits is not None for r in results) == tp  # every TP rank of the last stage has the logits
    return results


@pytest.mark.parametrize("model", ["llama", "deepseek"])
def test_tp2_pp2(pool4, model):
    check(pool4, model, 2, 2)


def test_tp2_pp2_llama_bf16(pool4):
    check(pool4, "llama", 2, 2, torch.bfloat16)


@pytest.mark.parametrize("model", ["llama", "deepseek"])
@pytest.mark.parametrize("tp, pp", [(1, 4), (4, 1)], ids=["tp1pp4", "tp4pp1"])
def test_other_four_rank_layouts(pool4, model, tp, pp):
    check(pool4, model, tp, pp)


@pytest.mark.parametrize("model", ["llama", "deepseek"])
def test_tp2_pp1(pool2, model):
    check(pool2, model, 2, 1)
