"""Piecewise CUDA graphs: the CPU-checkable parts (refusal, splitting, padding on warm-up calls) here; capture and
replay in tests/test_gpu.py."""
from unittest import mock

import pytest
import torch

import fxpasses
import fxpasses.cudagraphs as cg
from fxpasses.models import build_model, make_steps, run_steps


def test_cuda_graph_sizes_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="cuda_graph_sizes needs a CUDA device, and none is available here"):
        fxpasses.Backend(cuda_graph_sizes=[1, 2, 4])
    with pytest.raises(ValueError, match="cuda_graph_sizes is for the non-Inductor path"):
        fxpasses.Backend(inductor=True, cuda_graph_sizes=[1])


def test_split_at_attention_and_pad_on_warm_up_calls():
    """Each size's first call runs the pieces eagerly (the warm-up), so splitting, padding and the unpadded
    attention can be checked without a GPU."""
    steps = make_steps(128, prompt_lens=(5, 3), decode_steps=1)  # 8 tokens -> size 16, then 2 -> size 4
    expected = run_steps(build_model("llama"), steps)
    model = build_model("llama")
    backend = fxpasses.Backend()
    runners = []

    def compiler(gm, example_inputs, index):
        backend.run_pipeline(gm, index, None, defunctionalize=True)
        with mock.patch("torch.cuda.graph_pool_handle", lambda: None):
            runner = cg.PiecewiseCudaGraphs(gm, backend.token_dims[index].expr, [4, 16])
        runner._boxed_call = True
        runners.append(runner)
        return runner

    backend._fx_compiler = compiler
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    (runner,) = runners
    kinds = [type(p).__name__ for p in runner.pieces.values()]
    assert kinds.count("EagerSplit") == 4 and kinds.count("CapturedPiece") == 5  # 4 layers: 4 attentions
    assert len(runner.tensor_inputs) == 3  # input_ids, position_ids, slot_ids all carry the token count
    for piece in runner.pieces.values():
        if isinstance(piece, cg.EagerSplit):
            assert len(piece.token_args) == 5  # q, k, v, slot_ids, position_ids; not the two caches
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)  # padding changes BLAS blocking, not results
