"""Compile-ahead of our Triton kernels (fxpasses/compile_ahead.py), on a GPU: a cold process with an empty Triton
cache compiles every kernel its first calls launch before those calls (none is compiled by a launch), the outputs
are bit-identical to the same process without compile-ahead (the same kernels), and the report says what was done.
CPU: the runner built without a device does not rehearse anything."""
from __future__ import annotations

import tempfile

import pytest
import torch

from pattern_helpers import run_fresh_process

COLD_START = r"""
import json, os, sys, dataclasses, threading, torch, triton
import fxpasses
from fxpasses.models import Batch, LlamaConfig, build_model
compiles = []  # (kernel, compiled by a launch on this thread?): after compile-ahead a launch must find its kernel
def listen(*, src, cache_hit, **_):
    if not cache_hit:
        compiles.append((getattr(src, "name", str(src)), threading.current_thread() is threading.main_thread()))
triton.knobs.compilation.listener = listen
torch.manual_seed(0)
config = dataclasses.replace(LlamaConfig(num_layers=2, max_slots=8), dtype=torch.bfloat16)
with torch.device("cuda"):
    model = build_model("llama", config)
backend = fxpasses.Backend(cache=False, cuda_graph_sizes=[1, 8], splitting_ops=())
fn = torch.compile(model, backend=backend)
outs = []
with torch.inference_mode():
    for n in (1, 8, 5, 1, 8):  # warm-ups at 1 and 8, a padded 5, then captures
        g = torch.Generator().manual_seed(n)
        b = Batch(torch.randint(0, config.vocab_size, (n,), generator=g).cuda(), torch.full((n,), 3).cuda(),
                  torch.arange(n).cuda())
        fxpasses.mark_token_dim(b.input_ids, b.position_ids, b.slot_ids)
        outs.append(fn(b.input_ids, b.position_ids, b.slot_ids).float().cpu())
torch.save(outs, sys.argv[1])
notes = [n for n in backend.report.notes if "ahead" in n]
print(json.dumps({"compiles": compiles, "notes": notes}))
"""


@pytest.mark.gpu
def test_cold_start_compiles_every_kernel_before_the_first_call_and_changes_no_number():
    with tempfile.TemporaryDirectory() as tmp:
        ahead = run_fresh_process(COLD_START, f"{tmp}/ahead.pt", TRITON_CACHE_DIR=f"{tmp}/triton-a",
                                  FXPASSES_COMPILE_AHEAD="1", FXPASSES_CACHE="0")
        plain = run_fresh_process(COLD_START, f"{tmp}/plain.pt", TRITON_CACHE_DIR=f"{tmp}/triton-b",
                                  FXPASSES_COMPILE_AHEAD="0", FXPASSES_CACHE="0")
        # without compile-ahead every kernel compiles in a launch; with it, none does
        assert plain["compiles"] and all(by_launch for _, by_launch in plain["compiles"])
        assert not plain["notes"]
        assert not [name for name, by_launch in ahead["compiles"] if by_launch], ahead["compiles"]
        assert sorted(name for name, _ in ahead["compiles"]) == sorted(name for name, _ in plain["compiles"])
        (note,) = ahead["notes"]
        assert f"compiled {len(ahead['compiles'])} Triton kernel(s) ahead" in note, note
        for a, b in zip(torch.load(f"{tmp}/ahead.pt"), torch.load(f"{tmp}/plain.pt")):
            assert torch.equal(a, b)


def test_a_runner_without_a_device_rehearses_nothing():
    from fxpasses.cudagraphs import PiecewiseCudaGraphs

    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    runner = PiecewiseCudaGraphs(gm, __import__("sympy").Integer(4), [4], warmup_only=True)
    assert runner.compile_ahead is None


def test_scratch_takes_each_tensors_layout_at_the_captured_size_and_refuses_other_symbols():
    """What the rehearsal hands an op (CPU: the layout logic; the GPU test above runs the whole path): the fake
    tensor's shape, strides and storage offset with the token symbol bound, zero-filled; a size that needs another
    symbol, or scratch above the budget, is refused with its reason (that call then compiles at its first launch)."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fxpasses.compile_ahead import SCRATCH_LIMIT_BYTES, Layout

    env = ShapeEnv()
    tokens, other = env.create_unbacked_symint(), env.create_unbacked_symint()
    with FakeTensorMode(shape_env=env):
        view = torch.empty(tokens * 8 + 4).as_strided((tokens, 8), (8, 1), 4)  # a view at an offset
        pair = torch.empty(2 * tokens + 1, 3).t()
        unbound = torch.empty(other, 3)
    bind = {tokens.node.expr: sympy.Integer(5)}
    why: list[str] = []
    layout = Layout.of(view, bind, [SCRATCH_LIMIT_BYTES], why)
    assert layout == Layout((5, 8), (8, 1), 4, torch.float32, torch.device("cpu")) and not why
    z = layout.zeros()
    assert (z.shape, z.stride(), z.storage_offset()) == ((5, 8), (8, 1), 4) and not z.any()
    z = Layout.of(pair, bind, [SCRATCH_LIMIT_BYTES], why).zeros()
    assert (z.shape, z.stride()) == ((3, 11), (1, 3))
    assert Layout.of(unbound, bind, [SCRATCH_LIMIT_BYTES], why) is None
    assert why == ["sizes with symbols other than the token count"]
    why.clear()
    assert Layout.of(view, bind, [100], why) is None and "scratch above" in why[0]
