"""The fused all-reduce + add + RMSNorm over symmetric memory (``ops/triton_allreduce.py``).

CPU: the path selection and its gating (every flag, the table's limits, TP=1, unmeasured TP sizes, the off switch),
that every rank of a TP2, PP2 and TP2xPP2 mapping makes the same choice (a rank that chose differently would
deadlock), the kernels' logic under Triton's interpreter (one-shot and two-shot at W=2 and W=3, odd row counts,
NaN/inf rows, -0.0, bit-identical to the add_rms_norm kernel on the rank-order sum), the signal-pad protocol, and an
ahead-of-time sm_90 compile (system-scope release/acquire compare-and-swaps, vector loads, no multimem).

Multi-GPU (marked, skipped below 2 GPUs; one process per GPU over NCCL, NVLink multicast off): bit-identical to NCCL
+ add_rms_norm at W=2 for bf16, fp16 and float32 at 1..2048 tokens x 4096/8192 with NaN/inf/overflowing rows, every
rank's outputs identical, repeated calls, CUDA-graph replays with the signal pads back at zero, and a compiled TP2
Llama with full and piecewise CUDA graphs equal to eager.
"""
import hashlib
import os
import re

import pytest
import torch
from pattern_helpers import needs_triton, run_under_triton_interpreter

from fxpasses import Mapping, init_process_groups
from fxpasses.ops import triton_allreduce as ta
from fxpasses.testing import fake_process_group

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ---- selection and gating (CPU) ---------------------------------------------------------------------------------
TABLES = dict(one_shot_max_bytes={2: 64 * 4096 * 2}, two_shot_max_bytes={2: 512 * 4096 * 2})


@pytest.mark.parametrize("tokens,path", [(1, "one_shot"), (64, "one_shot"), (65, "two_shot"), (512, "two_shot"),
                                         (513, "nccl"), (2048, "nccl")])
def test_choice_follows_the_table_by_bytes(tokens, path):
    choice = ta.choose_allreduce(tokens, 4096, 2, torch.bfloat16, **TABLES)
    assert choice.path == path, choice
    # float32 rows are twice the bytes: the same limits at half the hidden size
    assert ta.choose_allreduce(tokens, 2048, 2, torch.float32, **TABLES).path == path


@pytest.mark.parametrize("gate,world,dtype,hidden,tokens,reason", [
    (ta.Gate(enabled=False), 2, torch.bfloat16, 4096, 1, "FXPASSES_SYMM_ALLREDUCE=0"),
    (ta.Gate(), 1, torch.bfloat16, 4096, 1, "TP size 1"),
    (ta.Gate(cuda=False), 2, torch.bfloat16, 4096, 1, "not CUDA"),
    (ta.Gate(nccl_group=False), 2, torch.bfloat16, 4096, 1, "not an NCCL group"),
    (ta.Gate(symm_mem="no peer access"), 2, torch.bfloat16, 4096, 1, "no symmetric memory: no peer access"),
    (ta.Gate(), 2, torch.float64, 4096, 1, "dtype torch.float64"),
    (ta.Gate(same_dtype=False), 2, torch.bfloat16, 4096, 1, "weight dtype"),
    (ta.Gate(contiguous=False), 2, torch.bfloat16, 4096, 1, "not contiguous"),
    (ta.Gate(), 2, torch.bfloat16, 32768, 1, "hidden 32768"),
    (ta.Gate(), 2, torch.bfloat16, 4096, 0, "no rows"),
    (ta.Gate(), 3, torch.bfloat16, 4096, 1, "TP size 3 not measured"),
])
def test_every_gate_falls_back_to_nccl_and_says_why(gate, world, dtype, hidden, tokens, reason):
    choice = ta.choose_allreduce(tokens, hidden, world, dtype, gate, **TABLES)
    assert choice.path == "nccl" and reason in choice.reason, choice


def test_measured_table_is_within_the_workspace():
    """Every size the table selects fits the workspace's areas, and the areas are 16-byte multiples (the kernels
    tell Triton the buffer pointers are 16-byte aligned)."""
    for world in set(ta.ONE_SHOT_MAX_BYTES) | set(ta.TWO_SHOT_MAX_BYTES):
        total = ta.workspace_bytes(world)
        assert total % 2 == 0 and (total // 2) % 16 == 0
        assert max(ta.ONE_SHOT_MAX_BYTES.get(world, 0), ta.TWO_SHOT_MAX_BYTES.get(world, 0)) <= total // 2


def test_gate_of_cpu_tensors_and_the_off_switch(monkeypatch):
    x = torch.randn(3, 64)
    gate = ta.gate_for(x, x.clone(), torch.ones(64))
    assert not gate.cuda and gate.symm_mem and "not CUDA" in gate.symm_mem and gate.enabled
    assert not ta.gate_for(x.t(), x.t(), torch.ones(3)).contiguous
    assert not ta.gate_for(x, x, torch.ones(64, dtype=torch.bfloat16)).same_dtype
    monkeypatch.setenv(ta.ENV_SWITCH, "0")
    gate = ta.gate_for(x, x, torch.ones(64))
    assert not gate.enabled
    assert ta.choose_allreduce(1, 64, 2, torch.float32, gate).reason == "FXPASSES_SYMM_ALLREDUCE=0"


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2), (1, 2)], ids=["tp2", "tp2xpp2", "pp2"])
def test_every_rank_of_a_mapping_makes_the_same_choice(tp, pp):
    """The choice reads only shapes, dtype, the TP group's size and facts that are the same on every rank: the same
    on each rank of the world, with PP as well as without it (the TP group of a TP2xPP2 mapping has 2 ranks, as
    TP2's). A mapping without TP (PP2) has TP groups of one rank: NCCL's path."""
    world = tp * pp
    for tokens, hidden in [(1, 4096), (32, 8192), (300, 4096), (2048, 8192)]:
        choices = []
        for rank in range(world):
            with fake_process_group(world, rank):
                groups = init_process_groups(Mapping(world_size=world, rank=rank, tp_size=tp, pp_size=pp))
                size = ta.group_size(groups.tp.group_name)
                assert size == tp
                choices.append(ta.choose_allreduce(tokens, hidden, size, torch.bfloat16, ta.Gate()))
        assert len(set(choices)) == 1, choices
        fits = tokens * hidden * 2 <= max([*ta.ONE_SHOT_MAX_BYTES.values(), *ta.TWO_SHOT_MAX_BYTES.values()])
        assert (choices[0].path == "nccl") == (tp == 1 or not fits), choices[0]


def test_a_fake_or_gloo_group_is_not_an_nccl_group():
    """A real CUDA run under the fake group (or gloo) must never try to map peers it does not have."""
    x = torch.randn(2, 8)
    with fake_process_group(2, 0) as world:
        assert not ta.gate_for(x, x, torch.ones(8), world.group_name).nccl_group
        assert ta.select(x, x, torch.ones(8), world.group_name).path == "nccl"


def test_cpu_op_is_untouched_by_the_cuda_kernel():
    """On CPU the op is still the eager reference (the fused kernel is registered for CUDA only)."""
    with fake_process_group(2, 0) as world:
        x, r, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
        out, rout = torch.ops.fxp.allreduce_add_rms_norm(x, r, w, 1e-6, world.group_name)
        ref_out, ref_rout = torch.ops.fxp.add_rms_norm(x, r, w, 1e-6)  # the fake group's all_reduce is the identity
        assert torch.equal(out, ref_out) and torch.equal(rout, ref_rout)


# ---- Triton's interpreter (CPU) ---------------------------------------------------------------------------------
def _reference(xs, residual, weight, eps):
    """The rank-order float32 sum rounded to the dtype, then the add_rms_norm kernel (under the interpreter)."""
    from fxpasses.ops import triton_kernels as tk

    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    return tk._launch(acc.to(xs[0].dtype), residual, weight, eps)


def _same(a, b):
    """Equal bit for bit (the sign of zero included), NaN where NaN (its payload aside)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return (torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
            and torch.equal(torch.signbit(a[~nan_a]), torch.signbit(b[~nan_b])))


def interpreter_checks() -> None:
    """Run by the test below in a process with TRITON_INTERPRET=1. The interpreter runs programs and ranks one after
    another, so the barriers are off here: each rank's buffer is pre-filled with its input, and the ranks run twice
    (two-shot's second round reads the sums the peers pushed in the first). That checks the indexing,
    masks, rounding and pushes; the signal-pad protocol is checked on its own below, memory ordering on the GPU."""
    from fxpasses.ops import triton_allreduce as t

    eps = 1e-6
    for world, rows, hidden, dtype, programs in [(2, 5, 96, torch.bfloat16, 3), (3, 7, 80, torch.float16, 2),
                                                 (2, 4, 64, torch.float32, 8), (3, 2, 33, torch.bfloat16, 4)]:
        g = torch.Generator().manual_seed(rows * hidden)
        xs = [(torch.randn(rows, hidden, generator=g) * 4).to(dtype) for _ in range(world)]
        xs[0][0, 3] = float("nan")
        xs[world - 1][rows - 1, 5] = float("inf")
        for x in xs:
            x[rows - 1, 0] = -0.0  # -0.0 + -0.0 must stay -0.0, as in NCCL's sum
            x[rows - 1, 1] = torch.finfo(dtype).max * 0.75  # a sum that overflows the dtype: inf, as NCCL's
        residual = torch.randn(rows, hidden, generator=g).to(dtype)
        residual[rows - 1, 0] = -0.0
        weight = torch.randn(hidden, generator=g).to(dtype)
        ref_out, ref_rout = _reference(xs, residual, weight, eps)
        # (ops.triton_rounding's fp16 path rounds -0.0 to +0.0, in add_rms_norm's kernel as in ours)
        assert torch.isnan(ref_out[0]).all() and (dtype == torch.float16 or torch.signbit(ref_rout[rows - 1, 0]))
        area = 4096 * 4
        bufs = [torch.zeros(2 * area, dtype=torch.uint8) for _ in range(world)]
        pads = [torch.zeros(256, dtype=torch.int32) for _ in range(world)]
        bptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
        sptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
        for path in ("one_shot", "two_shot"):
            for r in range(world):
                bufs[r].zero_()
                bufs[r][: rows * hidden * xs[r].element_size()].view(dtype).copy_(xs[r].reshape(-1))
            results = {}
            for r in [*range(world), *range(world)]:  # two rounds (see the docstring)
                state = torch.zeros(2, dtype=torch.int32)  # epoch 0 in both rounds: the prefilled input area
                launch = t.Launch(bptrs, sptrs, state, r, world, area, programs, barrier=False)
                results[r] = t.fused_allreduce_add_rms_norm(xs[r], residual, weight, eps, launch, path)
                assert state.tolist() == [1, 0], "the last program flipped the epoch and reset the count"
            for r in range(world):
                out, rout = results[r]
                assert _same(out, ref_out) and _same(rout, ref_rout), (path, world, rows, hidden, dtype, r)
    try:
        t.fused_allreduce_add_rms_norm(torch.zeros(8, 64), torch.zeros(8, 64), torch.ones(64), eps,
                                       t.Launch(bptrs, sptrs, state, 0, 2, 1024, 1, barrier=False), "one_shot")
    except ValueError as err:
        assert "do not fit the symmetric workspace" in str(err)
    else:
        raise AssertionError("an oversized call was accepted")

    # the epoch's second area: with the epoch at 1, one-shot reads every rank's inputs from the second area
    world, rows, hidden, dtype = 2, 3, 64, torch.bfloat16
    xs = [torch.randn(rows, hidden).to(dtype) for _ in range(world)]
    residual, weight = torch.randn(rows, hidden).to(dtype), torch.randn(hidden).to(dtype)
    area = 1024
    bufs = [torch.zeros(2 * area, dtype=torch.uint8) for _ in range(world)]
    bptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    bufs[1][area: area + rows * hidden * 2].view(dtype).copy_(xs[1].reshape(-1))
    state = torch.tensor([1, 0], dtype=torch.int32)
    out, rout = t.fused_allreduce_add_rms_norm(xs[0], residual, weight, eps,
                                               t.Launch(bptrs, sptrs, state, 0, world, area, 2, barrier=False),
                                               "one_shot")
    ref_out, ref_rout = _reference(xs, residual, weight, eps)
    assert _same(out, ref_out) and _same(rout, ref_rout) and state.tolist() == [0, 0]
    assert bufs[0][:area].eq(0).all(), "epoch 1 left the first area alone"

    # the signal-pad protocol: rank 0 of 2, with rank 1's signals already counted in each program's slot (two in
    # one slot: a signal sent before the previous one was taken is counted, not lost)
    world, programs, slots = 2, 3, 4
    for phase in (0, 1):
        pads = [torch.zeros(2 * slots * world, dtype=torch.int32) for _ in range(world)]
        sptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
        first = phase * slots * world
        for b in range(programs):
            pads[0][first + b * world + 1] = 2 if b == 0 else 1
        t._barrier_kernel[(programs,)](sptrs, slots, PHASE=phase, RANK=0, WORLD=world)
        left = [0] * (2 * slots * world)
        left[first + 1] = 1
        assert pads[0].tolist() == left, "rank 0 took one signal per program from rank 1"
        signalled = [0] * (2 * slots * world)
        for b in range(programs):
            signalled[first + b * world] = 1
        assert pads[1].tolist() == signalled, "and signalled rank 1 once per program, in the phase's slots"


@needs_triton
def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter("tests.test_symm_allreduce")


def hopper_compile_checks() -> None:
    """Compile both kernels for sm_90 ahead of time (no GPU needed): the barriers' system-scope release add and
    acquire read, the epoch's arrival count, all predicated to one thread per program; 16-byte vector loads from
    the peers' buffers; no multicast."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from fxpasses.ops import triton_allreduce as t

    types = {"X": "*bf16", "R": "*bf16", "Wt": "*bf16", "OUT": "*bf16", "ROUT": "*bf16", "BUF_PTRS": "*i64",
             "SIG_PTRS": "*i64", "STATE": "*i32", "slots": "i32", "rows": "i32", "chunk": "i32", "n_cols": "i32", "eps": "fp32", "area": "i32"}
    for kernel in (t._one_shot_kernel, t._two_shot_kernel):
        signature = {a: types[a] for a in kernel.arg_names if a in types}
        aligned = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in signature
                   if a not in ("rows", "chunk", "eps", "slots")}
        const = dict(RANK=1, WORLD=2, BLOCK=4096, BARRIER=True)
        src = ASTSource(kernel, {**signature, **{k: "constexpr" for k in const}}, const, aligned)
        ptx = triton_compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16)).asm["ptx"]
        atomics = re.findall(r"(@%p\d+ )?(atom\.[\w.]+)", ptx)
        assert atomics and all(pred for pred, _ in atomics), "every atomic predicated: one thread per program"
        kinds = {kind for _, kind in atomics}
        assert {"atom.global.sys.release.add.u32", "atom.global.gpu.acq_rel.add.u32"} <= kinds, kinds
        assert re.search(r"@%p\d+ ld\.global\.sys\.acquire\.b32", ptx), "the semaphore's acquire read"
        assert "ld.global.v4.b32" in ptx and "multimem" not in ptx


@needs_triton
def test_kernels_compile_for_hopper():
    run_under_triton_interpreter("tests.test_symm_allreduce", "hopper_compile_checks", interpret=False)


# ---- two GPUs over NCCL -----------------------------------------------------------------------------------------
def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


multigpu = pytest.mark.multigpu
needs_2_gpus = pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
TOKENS = (1, 7, 32, 300, 2048)
HIDDENS = (4096, 8192)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BIG = 2 * 2048 * 8192 * 4  # a workspace for every case above on both fused paths (the table selects fewer)


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _inputs(rank, tokens, hidden, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed * 100003 + tokens * 17 + hidden)
    residual = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)  # replicated: the same on each rank
    weight = torch.randn(hidden, device="cuda", generator=g).to(dtype)
    g.manual_seed(seed * 100003 + tokens * 17 + hidden + 7919 * (rank + 1))
    x = (torch.randn(tokens, hidden, device="cuda", generator=g) * 8).to(dtype)
    if tokens >= 3:  # a NaN and an inf on different ranks, and a row whose sum overflows the dtype
        if rank == 0:
            x[0, 1] = float("nan")
        else:
            x[1, 2] = float("inf")
        x[2, :4] = torch.finfo(dtype).max * 0.75
    return x, residual, weight


def rank_bit_identical(rank, world, dtypes, tokens_list, hiddens):
    """Each forced path and the op's own choice against NCCL + add_rms_norm, bit for bit; every rank's digests."""
    os.environ.update(SAFE_ENV)
    from fxpasses.ops import triton_allreduce as t

    group = torch.distributed.group.WORLD.group_name
    ws = t.workspace(group, torch.device("cuda"), min_bytes=BIG)
    failures, digests, paths = [], [], {}
    for dtype in dtypes:
        for tokens in tokens_list:
            for hidden in hiddens:
                x, residual, weight = _inputs(rank, tokens, hidden, dtype)
                ref = t.allreduce_add_rms_norm_nccl(x, residual, weight, 1e-5, group)
                paths[f"{dtype} {tokens}x{hidden}"] = t.select(x, residual, weight, group).path
                runs = {p: t.fused_allreduce_add_rms_norm(x, residual, weight, 1e-5, t.launch_for(ws), p)
                        for p in ("one_shot", "two_shot")}
                runs["op"] = torch.ops.fxp.allreduce_add_rms_norm(x, residual, weight, 1e-5, group)
                for name, (out, rout) in runs.items():
                    if not (_same(out, ref[0]) and _same(rout, ref[1])):
                        bad = (~((out == ref[0]) | (out.isnan() & ref[0].isnan()))).sum().item()
                        failures.append(f"{name} {dtype} {tokens}x{hidden}: {bad} outputs differ")
                    digests.append(_digest(out, rout))
    torch.cuda.synchronize()
    return {"failures": failures, "digests": digests, "paths": paths, "pad_zero": bool(t.signal_pad(ws).eq(0).all())}


def rank_repeats_and_cuda_graphs(rank, world):
    """Back-to-back calls with new inputs (no sync between), then a CUDA graph of three calls (one-shot, two-shot,
    one-shot) replayed three times with new inputs copied in: each result equals NCCL's, the pads end at zero. Then
    a new group's first call inside a capture (NCCL, no workspace), and its first eager call (the workspace)."""
    os.environ.update(SAFE_ENV)
    from fxpasses.ops import triton_allreduce as t

    group = torch.distributed.group.WORLD.group_name
    ws = t.workspace(group, torch.device("cuda"), min_bytes=BIG)
    failures = []
    shapes = [(1, 4096), (300, 8192), (7, 8192)]
    paths = ("one_shot", "two_shot", "one_shot")
    batches = [[_inputs(rank, n, h, torch.bfloat16, seed=s) for n, h in shapes] for s in range(4)]
    outs = [[t.fused_allreduce_add_rms_norm(*args, 1e-5, t.launch_for(ws), p) for args, p in zip(b, paths)]
            for b in batches]
    for s, b in enumerate(batches):
        for i, (x, r, w) in enumerate(b):
            ref = t.allreduce_add_rms_norm_nccl(x, r, w, 1e-5, group)
            if not (_same(outs[s][i][0], ref[0]) and _same(outs[s][i][1], ref[1])):
                failures.append(f"repeat {s} call {i}")
    static = [tuple(a.clone() for a in args) for args in batches[0]]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = [t.fused_allreduce_add_rms_norm(*args, 1e-5, t.launch_for(ws), p)
                      for args, p in zip(static, paths)]
    for s in (1, 2, 3):
        for dst, src in zip(static, batches[s]):
            for d, v in zip(dst, src):
                d.copy_(v)
        graph.replay()
        for i, (x, r, w) in enumerate(batches[s]):
            ref = t.allreduce_add_rms_norm_nccl(x, r, w, 1e-5, group)
            if not (_same(graph_outs[i][0], ref[0]) and _same(graph_outs[i][1], ref[1])):
                failures.append(f"replay {s} call {i}")
    # a group whose first call is inside a capture: NCCL for that call (no workspace can be made there), then the
    # first eager call makes the workspace and a later capture takes the fused path
    fresh = torch.distributed.new_group([0, 1])
    torch.distributed.barrier(group=fresh)  # NCCL's communicator for the group, outside the capture
    x, r, w = batches[1][0]
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        in_capture = torch.ops.fxp.allreduce_add_rms_norm(x, r, w, 1e-5, fresh.group_name)
    graph2.replay()
    made_in_capture = any(k[0] == fresh.group_name for k in t._WORKSPACES)
    eager = torch.ops.fxp.allreduce_add_rms_norm(x, r, w, 1e-5, fresh.group_name)
    ref = t.allreduce_add_rms_norm_nccl(x, r, w, 1e-5, group)
    for name, got in (("first call in a capture", in_capture), ("then eager", eager)):
        if not (_same(got[0], ref[0]) and _same(got[1], ref[1])):
            failures.append(name)
    torch.cuda.synchronize()
    return {"failures": failures, "pad_zero": bool(t.signal_pad(ws).eq(0).all()),
            "digest": _digest(*[o for pair in graph_outs for o in pair]), "made_in_capture": made_in_capture,
            "made_after": any(k[0] == fresh.group_name for k in t._WORKSPACES)}


def rank_llama(rank, world, cuda_graphs):
    """A compiled TP2 Llama (bf16) with CUDA graphs, the norm patterns taking the all-reduces (on CUDA the fused
    linear patterns would take the add and norm and leave the all_reduce on its own), against the same stage run
    eagerly (its all-reduces on NCCL)."""
    os.environ.update(SAFE_ENV)
    import dataclasses

    from fxpasses import Backend
    from fxpasses.models import MODELS, build_model, make_steps, run_steps

    mapping = Mapping(world_size=world, rank=rank, tp_size=world, pp_size=1)
    torch._dynamo.reset()
    init_process_groups(mapping)
    config = dataclasses.replace(MODELS["llama"][0](), num_layers=4, dtype=torch.bfloat16)
    torch.manual_seed(0)
    eager_stage = build_model("llama", config, mapping).cuda()
    torch.manual_seed(0)
    stage = build_model("llama", config, mapping).cuda()
    steps = [dataclasses.replace(b, **{f.name: getattr(b, f.name).cuda() for f in dataclasses.fields(b)})
             for b in make_steps(config.vocab_size, (5, 3), decode_steps=4)]
    names = ["rms_norm", "add_rms_norm", "allreduce_add_rms_norm", "rotary_embedding", "rope_attention",
             "silu_and_mul"]
    splits = () if cuda_graphs == "full" else ("fxp.attention",)
    backend = Backend(mapping, patterns=names, cuda_graph_sizes=[2, 4, 8, 16], splitting_ops=splits)
    eager = run_steps(eager_stage, steps)
    compiled = run_steps(stage, steps, torch.compile(stage, backend=backend))
    tp_group = init_process_groups(mapping).tp.group_name
    return {"matches": dict(backend.report.matches), "eager": [e.float().cpu() for e in eager],
            "compiled": [c.float().cpu() for c in compiled],
            "fused_ran": any(key[0] == tp_group for key in ta._WORKSPACES)}


@pytest.fixture(scope="module")
def pool():
    if _gpus() < 2:
        pytest.skip("needs 2 GPUs")
    from fxpasses.testing import RankPool

    os.environ.update(SAFE_ENV)
    with RankPool(2, backend="nccl", timeout=300) as p:
        yield p


@multigpu
@needs_2_gpus
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bit_identical_to_nccl_and_add_rms_norm(pool, dtype):
    results = pool.run(rank_bit_identical, [dtype], TOKENS, HIDDENS)
    assert results[0]["failures"] == [] and results[1]["failures"] == [], results[0]["failures"][:5]
    assert results[0]["digests"] == results[1]["digests"], "every rank holds the same bits"
    assert results[0]["paths"] == results[1]["paths"]
    assert all(r["pad_zero"] for r in results)


@multigpu
@needs_2_gpus
def test_repeats_and_cuda_graph_replays(pool):
    results = pool.run(rank_repeats_and_cuda_graphs)
    assert results[0]["failures"] == [] and results[1]["failures"] == [], results
    assert results[0]["digest"] == results[1]["digest"] and all(r["pad_zero"] for r in results)
    assert not any(r["made_in_capture"] for r in results) and all(r["made_after"] for r in results)


@multigpu
@needs_2_gpus
@pytest.mark.parametrize("cuda_graphs", ["full", "piecewise"])
def test_compiled_tp2_llama_equals_eager(pool, cuda_graphs):
    results = pool.run(rank_llama, cuda_graphs, timeout=300)
    for r in results:
        assert r["matches"].get("allreduce_add_rms_norm", 0) > 0, r["matches"]
        assert r["fused_ran"], "the fused kernel's workspace was made for the TP group (the op took a fused path)"
        for step, (got, want) in enumerate(zip(r["compiled"], r["eager"])):
            torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2, msg=lambda m, step=step: f"step {step}: {m}")
    assert all(torch.equal(a, b) for a, b in zip(results[0]["compiled"], results[1]["compiled"])), \
        "both TP ranks produce the same logits"
