"""Piecewise CUDA graphs: the CPU-checkable parts (refusal, splitting, padding on warm-up calls) here; capture and
replay in tests/test_gpu.py."""
from unittest import mock

import pytest
import torch

import fxpasses
import fxpasses.cudagraphs as cg
from fxpasses import ops
from fxpasses.models import build_model, make_steps, run_steps
from fxpasses.testing import warmup_cuda_graph_backend


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
    backend = warmup_cuda_graph_backend([4, 16])
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    (runner,) = backend.runners
    kinds = [type(p).__name__ for p in runner.pieces.values()]
    assert kinds.count("EagerSplit") == 4 and kinds.count("CapturedPiece") == 5  # 4 layers: 4 attentions
    assert len(runner.layout.tensor_inputs) == 3  # input_ids, position_ids, slot_ids all carry the token count
    for piece in runner.pieces.values():
        if isinstance(piece, cg.EagerSplit):
            assert len(piece.token_args) == 7  # q, k, v, slot_ids, position_ids, cos, sin; not the two caches
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)  # padding changes BLAS blocking, not results


def _run_on_cpu(backend, steps, model_name="llama"):
    expected = run_steps(build_model(model_name), steps)
    model = build_model(model_name)
    torch._dynamo.reset()
    got = run_steps(model, steps, torch.compile(model, backend=backend))
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["llama", "deepseek"])
def test_full_graph_pads_slots_with_the_ops_marker(model_name):
    """splitting_ops=(): one piece, attention inside it; the padded rows of slot_ids are filled with -1, so the
    padded tokens write nothing into the caches: had the 8 padded rows of the prefill written slot 0 (a zero fill),
    the decode step, which reads slot 0, would differ from eager."""
    steps = make_steps(128, prompt_lens=(5, 3), decode_steps=1)  # 8 tokens -> size 16, then 2 -> 4; once each (CPU)
    backend = warmup_cuda_graph_backend([4, 16], splitting_ops=())
    with mock.patch.dict(ops.TOKEN_PADDING, {torch.ops.fxp.attention.default: {"slot_ids": -1}, torch.ops.fxp.attention.rope: {"slot_ids": -1}}):
        _run_on_cpu(backend, steps, model_name)
    (runner,) = backend.runners
    assert [type(p).__name__ for p in runner.pieces.values()] == ["CapturedPiece"]
    assert list(runner.pad_values.values()) == [-1]  # exactly one input, slot_ids, is padded with the marker
    assert set(runner.pieces["submod_0"].entries) == {4, 16}


def test_full_graph_refuses_an_op_that_cannot_mark_padding():
    backend = warmup_cuda_graph_backend([4, 16], splitting_ops=())
    with mock.patch.dict(ops.TOKEN_PADDING, clear=True), \
            pytest.raises(Exception, match=r"fxp.attention \(node .*\) writes .* outside the token dimension.*"
                                           r"Keep it in splitting_ops"):
        _run_on_cpu(backend, make_steps(128, decode_steps=0))


def test_one_token_static_graph_is_captured_at_its_size():
    """Dynamo specializes 1 token (its 0/1 rule): the decode step is a second, static graph, which gets its own
    runner at size 1 (and a note when a static size is above the largest captured size)."""
    steps = make_steps(128, prompt_lens=(5,), decode_steps=1)  # 5 tokens (dynamic graph), then 1 (static graph)
    backend = warmup_cuda_graph_backend([2, 8])
    _run_on_cpu(backend, steps)
    assert backend.report.graphs == 2
    dynamic, static = backend.runners
    assert dynamic.static_tokens is None and static.static_tokens == 1 and static.sizes == [1]
    assert all(not p.token_args for p in static.pieces.values() if isinstance(p, cg.EagerSplit))
    backend = warmup_cuda_graph_backend([2])
    batch = make_steps(128, prompt_lens=(5,), decode_steps=0)[0]
    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(build_model("llama"), backend=backend, dynamic=False)(batch.input_ids, batch.position_ids,
                                                                            batch.slot_ids)
    assert not backend.runners
    assert any("static token count 5 is above the largest CUDA-graph size 2" in n for n in backend.report.notes)


def test_unbacked_token_dimension_serves_one_token_from_the_same_graph():
    """A serving loop can mark the token dimension unbacked (fxpasses.mark_token_dim): Dynamo then does not
    specialize 1 token, so one graph (one compile) serves 1 token and more, padded to the captured sizes."""
    steps = make_steps(128, prompt_lens=(5,), decode_steps=1)  # 5 tokens (-> size 8), then 1 (size 1)
    expected = run_steps(build_model("llama"), steps)
    model = build_model("llama")
    backend = warmup_cuda_graph_backend([1, 8], splitting_ops=())
    torch._dynamo.reset()
    got = []
    with mock.patch.dict(ops.TOKEN_PADDING, {torch.ops.fxp.attention.default: {"slot_ids": -1}, torch.ops.fxp.attention.rope: {"slot_ids": -1}}), \
            torch.inference_mode():
        fn = torch.compile(model, backend=backend)
        for b in steps:
            fxpasses.mark_token_dim(b.input_ids, b.position_ids, b.slot_ids)
            got.append(fn(b.input_ids, b.position_ids, b.slot_ids))
    assert backend.report.graphs == 1
    (runner,) = backend.runners
    assert runner.static_tokens is None and set(runner.pieces["submod_0"].entries) == {1, 8}
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


class ShiftedSlots(torch.nn.Module):
    """Attention whose slot ids are computed in the graph (slot + 1): padded rows cannot be marked there."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.zeros(4, 8, 1, 4))
        self.register_buffer("v", torch.zeros(4, 8, 1, 4))

    def forward(self, input_ids, position_ids, slot_ids):
        x = input_ids.float()[:, None, None].expand(-1, 1, 4)
        return torch.ops.fxp.attention(x, x, x, self.k, self.v, slot_ids + 1, position_ids, 0.5)


def test_full_graph_refuses_a_marker_argument_computed_in_the_graph():
    backend = warmup_cuda_graph_backend([4], splitting_ops=())
    ids, pos, slots = torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([0, 1])
    for t in (ids, pos, slots):
        torch._dynamo.mark_dynamic(t, 0)
    torch._dynamo.reset()
    with mock.patch.dict(ops.TOKEN_PADDING, {torch.ops.fxp.attention.default: {"slot_ids": -1}, torch.ops.fxp.attention.rope: {"slot_ids": -1}}), \
            torch.inference_mode(), \
            pytest.raises(Exception, match=r"padded tokens are marked through argument 'slot_ids', but that is "
                                           r"computed in the graph \(add.*\), not a graph input\. Keep fxp.attention "
                                           r"in splitting_ops"):
        torch.compile(ShiftedSlots(), backend=backend)(ids, pos, slots)
