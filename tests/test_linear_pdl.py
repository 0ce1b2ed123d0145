"""Programmatic dependent launch (PDL) in the decode GEMVs, and the pass that proves a weight may be read before
the PDL wait (``fxpasses/stable_weights.py``; kernels in ``ops/triton_linear.py``).

CPU: the pass through real ``torch.compile``. A reference Llama (``fxpasses.models``) cannot be traced by Dynamo on
fake CUDA tensors with a CPU-only torch (it indexes its RoPE tables), so its AOT graph is captured on the CPU,
pointed at (fake) CUDA and rewritten with ``fxpasses.rewrite``: every projection is marked, and the graph run on
the CPU equals eager bit for bit. Small models that only project are compiled with the ``fxpasses.Backend`` on
fake CUDA tensors: a weight updated in place inside the compiled function is refused with the reason (before or
after its projection), and so is a projection of a graph input. Triton's interpreter (where Triton is installed)
runs the prefetching K walk; an sm_90 compile checks where ``griddepcontrol.wait`` lands.

GPU (marked): every op at one token with PDL equals ``FXPASSES_PDL=0`` bit for bit, with and without
``weight_stable``, outside and inside CUDA graphs, after kernels that are not PDL launches (cuBLAS, the norm
kernel) as well as after our own; a compiled Llama with full CUDA graphs equals eager.
"""
import dataclasses
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fxpasses
from fxpasses.stable_weights import verdicts_of
from fxpasses.testing import RecordingBackend
from pattern_helpers import aot_graph_on_cpu, fake_cuda, needs_triton, point_graph_at, run_under_triton_interpreter

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FAMILY = ("linear", "rms_norm_linear", "add_rms_norm_linear", "linear_silu_mul", "add_rms_norm_linear_silu_mul")


def rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _pass_notes(report) -> list[str]:
    return [n for r in report.passes if r.name == "weights/mark_stable_weights" for n in r.notes]


# ---- CPU: the reference Llama ---------------------------------------------------------------------------------
def _llama_aot_graph(config):
    """The Llama's AOT graph for a decode step, compiled on the CPU, and that step's real inputs."""
    from fxpasses.models import build_model, make_steps

    batch = make_steps(config.vocab_size)[-1]  # a decode step
    gm, real, _ = aot_graph_on_cpu(build_model("llama", config), batch.input_ids, batch.position_ids,
                                   batch.slot_ids, grad_mode=torch.inference_mode)
    return gm, real


def test_every_projection_of_a_llama_is_weight_stable_and_the_graph_equals_eager():
    from fxpasses.models import LlamaConfig

    config = dataclasses.replace(LlamaConfig(), dtype=torch.bfloat16, num_layers=2)
    gm, real = _llama_aot_graph(config)
    with torch.no_grad():
        want = gm(*[t.clone() for t in real])
    point_graph_at(gm, "cuda")  # the graph's factory calls onto (fake) CUDA, where the patterns apply
    with FakeTensorMode():
        fakes = [fake_cuda(t) for t in real]
    gm, report = fxpasses.rewrite(gm, example_inputs=fakes)
    expected = config.predicted_matches(fxpasses.Mapping(), cuda=True)
    projections = sum(v for k, v in expected.items() if k in FAMILY)
    assert {k: report.matches.get(k, 0) for k in FAMILY} == {k: expected.get(k, 0) for k in FAMILY}
    verdicts = verdicts_of(gm)
    assert len(verdicts) == projections == 9 and all(v.stable for v in verdicts), verdicts
    record = next(r for r in report.passes if r.name == "weights/mark_stable_weights")
    assert record.counts == {"weight_stable": projections} and not record.error
    assert _pass_notes(report) == [f"{projections} of {projections} linear-family nodes weight-stable (their GEMV "
                                   "reads the first weight block before the PDL wait)"]
    point_graph_at(gm, "cpu")  # back to the CPU, where every op is its composition and ignores the flag
    with torch.no_grad():
        got = gm(*[t.clone() for t in real])
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


# ---- CPU: weights the graph writes, through the Backend -------------------------------------------------------
class Mlp(nn.Module):
    """Two ``fxp.linear`` projections (the op itself, which the pass reads the same on any device: on a CUDA graph
    the patterns put it there) of a computed activation; ``update``: where the first weight is written in place
    inside the compiled function ("before" its projection reads it, "after", or None)."""

    def __init__(self, update: str | None = None, raw_input: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = nn.Parameter(torch.randn(32, 16, generator=g).to(torch.bfloat16), requires_grad=False)
        self.down = nn.Parameter(torch.randn(16, 32, generator=g).to(torch.bfloat16), requires_grad=False)
        self.update, self.raw_input = update, raw_input

    def forward(self, x, delta):
        if self.update == "before":
            self.up.add_(delta)
        h = torch.ops.fxp.linear(x if self.raw_input else torch.tanh(x), self.up)
        if self.update == "after":
            self.up.mul_(delta)
        return torch.ops.fxp.linear(torch.relu(h), self.down)


def _compile(update=None, raw_input=False):
    """The model compiled with a recording Backend on the CPU, run once; eager on a copy. Returns (compiled output,
    its weights after the call, eager's output, eager's weights after it, backend)."""
    model, twin = Mlp(update, raw_input), Mlp(update, raw_input)
    x, delta = rand(1, 16, dtype=torch.bfloat16), 1 + 0.1 * rand(32, 16, dtype=torch.bfloat16, seed=1)
    backend = RecordingBackend()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x, delta)
        want = twin(x, delta)
    assert len(backend.records) == 1
    return got, dict(model.named_parameters()), want, dict(twin.named_parameters()), backend


def _verdicts(backend):
    return {v.node: v for v in verdicts_of(backend.records[0].module)}


@pytest.mark.parametrize("update, reason", [
    (None, None),
    ("after", "is written in the graph by copy_"),  # AOT keeps the input mutation as a copy_ into the parameter
    ("before", "is computed in the graph (by aten.add.Tensor)"),  # the projection reads the updated value
])
def test_a_weight_written_inside_the_compiled_function_is_refused_with_the_reason(update, reason):
    got, ours, want, theirs, backend = _compile(update)
    verdicts = list(_verdicts(backend).values())
    assert [v.op for v in verdicts] == ["fxp.linear", "fxp.linear"]
    first, second = verdicts
    assert second.stable  # the down projection's weight is never written
    notes = _pass_notes(backend.report)
    if reason is None:
        assert first.stable and len(notes) == 1 and notes[0].startswith("2 of 2 "), notes
    else:
        assert not first.stable
        assert notes[0].startswith("1 of 2 ") and len(notes) == 2 and reason in notes[1], notes
        assert "copy_" in backend.records[0].code_after if update == "after" else True  # the write is in the graph
    # the marks change nothing: the compiled result equals eager bit for bit, the weight's update included
    assert torch.equal(got, want)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_projection_of_a_graph_input_is_not_marked():
    """Its kernel may be the step's first: the kernel before it may be a weight update outside the graph."""
    got, _, want, _, backend = _compile(raw_input=True)
    first, second = _verdicts(backend).values()
    assert not first.stable and second.stable
    assert "x comes straight from a graph input" in _pass_notes(backend.report)[1]
    assert torch.equal(got, want)


def test_the_pass_is_not_in_the_inductor_pipeline_and_the_cpu_op_ignores_the_flag():
    from fxpasses.pipeline import build_pipeline

    names = lambda manager: [s.name for s in manager.stages]  # noqa: E731
    assert "weights" in names(build_pipeline()) and "weights" not in names(build_pipeline(defunctionalize_after=False))
    fxp = torch.ops.fxp
    x, w, up = rand(2, 16), rand(24, 16, seed=1), rand(24, 16, seed=2)
    nw, r = rand(16, seed=3), rand(2, 16, seed=4)
    for flag in (False, True):
        assert torch.equal(fxp.linear(x, w, None, flag), F.linear(x, w))
        assert torch.equal(fxp.linear_silu_mul(x, w, up, weight_stable=flag), fxp.linear_silu_mul(x, w, up))
        assert torch.equal(fxp.add_rms_norm_linear(x, r, nw, 1e-5, w, flag)[0], fxp.add_rms_norm_linear(x, r, nw, 1e-5, w)[0])


# ---- Triton: the interpreter and an sm_90 compile -------------------------------------------------------------
def interpreter_checks() -> None:
    """Under ``TRITON_INTERPRET=1``: PDL is off (the interpreter runs no PTX) whatever ``FXPASSES_PDL`` says, the ops
    with ``weight_stable`` equal them without it, and the prefetching K walk (the first weight block loaded before
    the loop; ``PREFETCH`` without the wait, which the interpreter cannot run) gives the same bits as the plain walk,
    for the plain GEMV and the fused kernel (norm prologue, residual, SiLU-and-mul, K not a multiple of the step)."""
    from fxpasses.ops import triton_linear as tl_lin

    assert not tl_lin.pdl_enabled(torch.device("cpu")) and not tl_lin.pdl_enabled(torch.device("cuda"))
    os.environ["FXPASSES_PDL"] = "yes"  # bad input: named, with what to set instead
    try:
        tl_lin.pdl_enabled(torch.device("cuda"))
        raise AssertionError("FXPASSES_PDL=yes was accepted")
    except ValueError as err:
        assert "FXPASSES_PDL='yes': set it to 1" in str(err), err
    finally:
        del os.environ["FXPASSES_PDL"]
    dt = torch.bfloat16
    for n, k, block_n, block_k in [(24, 64, 4, 32), (10, 40, 4, 32), (8, 64, 2, 64)]:
        x, r = rand(1, k, dtype=dt), rand(1, k, dtype=dt, seed=1)
        w, up, nw = rand(n, k, dtype=dt, seed=2), rand(n, k, dtype=dt, seed=3), 1 + 0.1 * rand(k, dtype=dt, seed=4)
        even = k % block_k == 0 and n % block_n == 0
        outs = []
        for prefetch in (False, True):
            out = torch.full((1, n), float("nan"), dtype=dt)
            tl_lin._gemv_kernel[(triton_cdiv(n, block_n), 1)](x, w, out, out, n, k, k, k, n, HAS_BIAS=False, EVEN=even,
                                                               BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=prefetch)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]) and not outs[0].isnan().any(), (n, k)
        for one_pass, silu in [(True, True), (True, False), (False, False)]:
            fused = []
            for prefetch in (False, True):
                out, h = torch.full((1, n), float("nan"), dtype=dt), torch.empty(1, k, dtype=dt)
                tl_lin._fused_gemv_kernel[(triton_cdiv(n, block_n), 1)](
                    x, r, nw, w, up, out, h, n, k, k, k, k, k, n, 1e-5, NORM=True, NORM_ONE_PASS=one_pass,
                    HAS_RESIDUAL=True, SILU_MUL=silu, EVEN=even, BLOCK_N=block_n, BLOCK_K=block_k,
                    BLOCK_ROW=1 if one_pass else triton_next_pow2(k), ROW_IN_REGS=False, PERSISTENT=False,
                    PREFETCH=prefetch and one_pass)  # the two-pass prologue reads the row first: it waits first
                fused.append((out, h))
            assert all(torch.equal(a, b) for a, b in zip(*fused)) and not fused[0][0].isnan().any(), (n, k, one_pass)
        # the launchers: weight_stable without PDL (the interpreter's case) is the plain kernel
        config = tl_lin.Config(1, block_n, block_k, 4, 1, one_pass=True)
        plain = tl_lin.launch(x, w, None, config)
        assert torch.equal(tl_lin.launch(x, w, None, config, pdl=False, weight_stable=True), plain)
        fused = tl_lin.launch_fused(x, w, config, norm_weight=nw, eps=1e-5, residual=r, up_weight=up)
        again = tl_lin.launch_fused(x, w, config, norm_weight=nw, eps=1e-5, residual=r, up_weight=up, pdl=False,
                                    weight_stable=True)
        assert torch.equal(fused[0], again[0]) and torch.equal(fused[1], again[1])
    # the split-K kernel (2..32 tokens): its first weight tile read before the loop, K split or not, swap-AB or not
    for m, n, k, config in [(3, 40, 96, tl_lin.Config(16, 16, 32, 4, 1, split=3)),
                            (8, 64, 100, tl_lin.Config(16, 32, 32, 4, 1, split=2, swap=True)),
                            (5, 16, 64, tl_lin.Config(16, 16, 16, 4, 1, split=1))]:
        x, w = rand(m, k, dtype=dt, seed=5), rand(n, k, dtype=dt, seed=6)
        outs = []
        for prefetch in (False, True):
            out = torch.full((m, n), float("nan"), dtype=dt)
            splits, per = tl_lin.split_plan(k, config.block_k, config.split)
            ws = torch.empty((splits, m, n), dtype=torch.float32)
            cnt = torch.zeros(triton_cdiv(n, config.block_n), dtype=torch.int32)
            tl_lin._split_k_kernel[(triton_cdiv(n, config.block_n), splits)](
                x, w, out, out, ws, cnt, m, n, k, k, k, n, per, HAS_BIAS=False, EVEN_K=k % config.block_k == 0,
                SPLITS=splits, SWAP=config.swap, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, PREFETCH=prefetch)
            outs.append(out)
            assert not cnt.any()  # the counters back at zero
        assert torch.equal(outs[0], outs[1]) and not outs[0].isnan().any(), (m, n, k, config)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@needs_triton
def test_prefetching_walk_under_triton_interpreter():
    run_under_triton_interpreter("tests.test_linear_pdl")


def hopper_compile_checks() -> None:
    """Compile the PDL variants for sm_90 (no GPU): ``griddepcontrol.wait`` then ``launch_dependents`` in each; with
    ``PREFETCH`` a global load comes before the wait (the first weight block), without it none does (wait first);
    without PDL neither instruction is there (the ``FXPASSES_PDL=0`` kernel is the old one)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from fxpasses.ops import triton_linear as tl_lin

    def ptx(kernel, signature, const):
        aligned = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in signature if a != "M"}
        src = ASTSource(kernel, {**signature, **{c: "constexpr" for c in const}}, const, aligned)
        return triton_compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1)).asm["ptx"]

    def check(code, pdl, prefetch, what):
        body = code[code.index("{"):]
        if not pdl:
            assert "griddepcontrol" not in body, what
            return
        wait = body.index("griddepcontrol.wait")
        assert body.index("griddepcontrol.launch_dependents") > wait, what
        assert ("ld.global" in body[:wait]) == prefetch, what

    gemv = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "OUT": "*bf16", **{a: "i32" for a in ("N", "K", "sxm", "swn", "som")}}
    for pdl, prefetch, even in [(True, True, True), (True, True, False), (True, False, True), (False, False, True)]:
        code = ptx(tl_lin._gemv_kernel, gemv, dict(HAS_BIAS=False, EVEN=even, BLOCK_N=4, BLOCK_K=1024, PDL_WAIT=pdl,
                                                   PREFETCH=prefetch))
        check(code, pdl, prefetch, ("gemv", pdl, prefetch, even))
    fused = {**{a: "*bf16" for a in ("X", "R", "NW", "W", "W2", "OUT", "ROUT")},
             **{a: "i32" for a in ("N", "K", "sxm", "srm", "srom", "swn", "som")}, "eps": "fp32"}
    for one_pass, silu, persistent, prefetch in [(True, True, False, True), (True, False, False, True),
                                                 (False, True, False, False), (True, True, True, False)]:
        top = persistent or not one_pass
        const = dict(NORM=True, NORM_ONE_PASS=one_pass, HAS_RESIDUAL=True, SILU_MUL=silu, EVEN=True, BLOCK_N=4,
                     BLOCK_K=512, BLOCK_ROW=1 if one_pass else 2048, ROW_IN_REGS=False, PERSISTENT=persistent,
                     PDL_TOP=top, PDL_WAIT=not top, PREFETCH=prefetch)
        check(ptx(tl_lin._fused_gemv_kernel, fused, const), True, prefetch, const)
    split = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "OUT": "*bf16", "WS": "*fp32", "CNT": "*i32",
             **{a: "i32" for a in ("M", "N", "K", "sxm", "swn", "som", "k_per_split")}}
    for prefetch, even, swap in [(False, True, True), (True, True, True), (True, False, False)]:
        const = dict(HAS_BIAS=False, EVEN_K=even, SPLITS=4, SWAP=swap, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
                     PDL_WAIT=True, PREFETCH=prefetch)
        check(ptx(tl_lin._split_k_kernel, split, const), True, prefetch, ("split-K", const))


@needs_triton
def test_pdl_variants_compile_for_hopper():
    run_under_triton_interpreter("tests.test_linear_pdl", "hopper_compile_checks", interpret=False)


# ---- GPU ------------------------------------------------------------------------------------------------------
@pytest.fixture
def pdl_env(monkeypatch):
    """Set FXPASSES_PDL for a block: ``with pdl_env("0"): ...``."""
    import contextlib

    @contextlib.contextmanager
    def setting(value):
        old = os.environ.get("FXPASSES_PDL")
        os.environ["FXPASSES_PDL"] = value
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("FXPASSES_PDL", None)
            else:
                os.environ["FXPASSES_PDL"] = old

    return setting


def _op_calls(n: int, k: int, dtype=torch.bfloat16):
    """Every op of the family at one token on shapes its table runs as a Triton kernel (Llama-3.2-1B's), each
    reading the output of the previous call, so each PDL launch depends on the kernel just before it."""
    fxp = torch.ops.fxp
    dev = "cuda"
    w = {name: rand(*shape, dtype=dtype, seed=i, device=dev) * 0.03 for i, (name, shape) in enumerate([
        ("qkv", (3072, 2048)), ("o", (2048, 2048)), ("gate_up", (16384, 2048)), ("down", (2048, 8192)),
        ("odd", (1000, 2048))])}
    nw = (1 + 0.1 * rand(2048, dtype=torch.float32, seed=9)).to(dtype).to(dev)

    def chain(x, r, stable):
        qkv = fxp.add_rms_norm_linear(x, r, nw, 1e-5, w["qkv"], stable)
        q = fxp.rms_norm_linear(qkv[0][:, :2048].contiguous(), nw, 1e-5, w["qkv"], stable)
        o = fxp.linear(q[:, :2048], w["o"], None, stable)
        act, h = fxp.add_rms_norm_linear_silu_mul(o, qkv[1], nw, 1e-5, w["gate_up"], None, stable)
        act2 = fxp.linear_silu_mul(h, w["gate_up"], None, stable)
        down = fxp.linear(act * act2, w["down"], None, stable)
        odd = fxp.linear(down, w["odd"], None, stable)  # a shape off the table: cuBLAS, then PDL kernels again
        cublas = torch.mm(down, w["o"].t())  # a non-PDL kernel writing the next op's input
        after = fxp.linear(cublas, w["o"], None, stable)
        return qkv[0], q, o, act, h, act2, down, odd, after

    return chain


@gpu
@needs_cuda
@pytest.mark.parametrize("prologue", ["", "norm"], ids=["table", "two-pass"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_pdl_equals_no_pdl_bit_for_bit_for_every_op(graph, prologue, pdl_env, monkeypatch):
    """``prologue`` "norm": FXPASSES_UNFUSED_GEMV=norm, the two-pass prologue on a persistent grid everywhere
    (the kernels that wait first thing, PDL_TOP)."""
    from fxpasses.ops import triton_linear as tl_lin

    monkeypatch.setenv("FXPASSES_UNFUSED_GEMV", prologue)

    assert tl_lin.pdl_enabled(torch.device("cuda")) == (torch.cuda.get_device_capability() >= (9, 0))
    chain = _op_calls(2048, 2048)
    x, r = rand(1, 2048, dtype=torch.bfloat16, device="cuda"), rand(1, 2048, dtype=torch.bfloat16, seed=1, device="cuda")

    def run(setting, stable):
        with pdl_env(setting):
            if not graph:
                return [t.clone() for t in chain(x, r, stable)]
            chain(x, r, stable)  # warm-up: compiles, and the split-K counters exist before the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs = chain(x, r, stable)
            results = []
            for seed in (5, 6):  # replays on new inputs
                x.copy_(rand(1, 2048, dtype=torch.bfloat16, seed=seed, device="cuda"))
                g.replay()
                torch.cuda.synchronize()
                results += [t.clone() for t in outs]
            x.copy_(rand(1, 2048, dtype=torch.bfloat16, device="cuda"))
            return results

    want = run("0", False)
    for setting, stable in (("1", False), ("1", True), ("wait", True)):
        got = run(setting, stable)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), (i, setting, stable, (g.float() - w.float()).abs().max().item())


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [2, 8, 32])
def test_small_token_kernels_with_pdl_equal_no_pdl(m, pdl_env):
    """2-32 tokens (split-K, several-rows and tl.dot kernels; split-K with its first weight tile read before the
    wait where the weight is stable), eager and replayed in a CUDA graph."""
    fxp = torch.ops.fxp
    ws = [rand(n, k, dtype=torch.bfloat16, seed=i, device="cuda") * 0.03
          for i, (n, k) in enumerate([(2048, 2048), (512, 2048), (2048, 8192), (8192, 2048)])]
    x = rand(m, 2048, dtype=torch.bfloat16, seed=7, device="cuda")

    def chain(stable):
        a = fxp.linear(x, ws[0], None, stable)
        b = fxp.linear(a, ws[1], None, stable)
        c = fxp.linear(torch.cat([a, a, a, a], dim=-1), ws[2], None, stable)
        return a, b, c, fxp.linear(c, ws[3], None, stable)

    def run(setting, stable):
        with pdl_env(setting):
            eager = [t.clone() for t in chain(stable)]
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs = chain(stable)
            g.replay()
            torch.cuda.synchronize()
            return eager + [t.clone() for t in outs]

    want = run("0", False)
    for stable in (False, True):
        got = run("1", stable)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), stable


@gpu
@needs_cuda
def test_compiled_llama_with_full_cuda_graphs_and_pdl_equals_no_pdl_and_eager(pdl_env):
    """Two layers of Llama-3.2-1B's shapes (small vocabulary; every projection but the LM head runs a Triton
    kernel at one token), prefill then 1-token decode steps in full CUDA graphs: with PDL (every projection marked
    weight-stable) the same bits as with FXPASSES_PDL=0, and equal to eager at the model tests' tolerance."""
    from fxpasses.models import LlamaConfig, build_model, make_steps, run_steps

    config = LlamaConfig.llama_3_2_1b(num_layers=2, vocab_size=1024, dtype=torch.bfloat16, max_len=64)
    steps = [dataclasses.replace(b, **{k: getattr(b, k).cuda() for k in ("input_ids", "position_ids", "slot_ids")})
             for b in make_steps(config.vocab_size, prompt_lens=(6,), decode_steps=4)]
    expected = run_steps(build_model("llama", config).cuda(), steps)
    results = {}
    for setting in ("1", "0"):
        with pdl_env(setting):
            model = build_model("llama", config).cuda()
            backend = fxpasses.Backend(cuda_graph_sizes=[1, 2, 4, 8], splitting_ops=())
            torch._dynamo.reset()
            results[setting] = run_steps(model, steps, torch.compile(model, backend=backend))
        records = [r for r in backend.report.passes if r.name == "weights/mark_stable_weights"]
        assert records and all(r.counts.get("weight_stable") for r in records), [r.notes for r in records]
        for r in records:  # "N of N linear-family nodes weight-stable ..."
            marked, total = r.notes[0].split(" linear-family")[0].split(" of ")
            assert marked == total, r.notes
    for p, n, e in zip(results["1"], results["0"], expected):
        assert torch.equal(p, n)
        torch.testing.assert_close(p.float(), e.float(), rtol=5e-2, atol=5e-2)
