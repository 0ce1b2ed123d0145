"""The split-K small-M GEMM of ``fxp.linear`` (``_split_k_kernel`` in ``ops/triton_linear.py``, 2..32 tokens).

CPU, under Triton's interpreter (where Triton is installed, or its site directory is in FXPASSES_TRITON_SITE, as
tests/test_linear.py runs it): the kernel's logic at small odd shapes (K not a multiple of the K step, N not a
multiple of the column block, 2..32 rows, with and without swap-AB and bias, one split and several) against a
float64 reference, the arrival counters left at zero, and the split plan. GPU (marked): against float64 and
cuBLAS at odd and Llama shapes, bit-identical run to run, inside a CUDA graph replayed twice (the counters reset
themselves), and the op's choice.
"""

import pytest
import torch
import torch.nn.functional as F
from pattern_helpers import needs_triton, run_fresh_process, run_under_triton_interpreter

fxp = torch.ops.fxp
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROWS = (2, 3, 7, 9, 17, 31, 32)


def rand(*shape, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def rel_err(out, x, w, b=None):
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    return ((out.double() - ref).norm() / ref.norm()).item()


# ---- Triton's interpreter (CPU) ---------------------------------------------------------------------------------
def interpreter_checks() -> None:
    """Run by the test below in a process with TRITON_INTERPRET=1 (the interpreter must be on when the kernels are
    defined). The interpreter runs the programs one after another, so this checks the tile arithmetic, the masks,
    the split plan and the last-arrival reduction, not the memory ordering (the GPU tests do)."""
    from fxpasses.ops import triton_linear as tl_lin
    from fxpasses.ops import arrival_counters

    assert tl_lin.split_plan(4096, 256, 4) == (4, 1024)
    assert tl_lin.split_plan(100, 32, 3) == (2, 64)  # 4 steps: 2 + 2, not 2 + 1 + 1 into 3 non-empty splits
    assert tl_lin.split_plan(2048, 256, 64) == (8, 256)  # never more splits than K steps
    # the table: every split-K entry is a tile its bucket fits, with the split count its shape really gets; 9..16
    # rows take the 8-row entry where it is a 16-row tile and no 16-row entry exists
    for (bucket, n, k), c in tl_lin.TABLE.items():
        if c.split:
            assert c.block_m >= bucket and tl_lin.split_plan(k, c.block_k, c.split)[0] == c.split, (bucket, n, k)
    assert tl_lin.choose(12, 4096, 4096) == tl_lin.TABLE[(8, 4096, 4096)]
    assert tl_lin.choose(12, 4096, 14336) == tl_lin.TABLE[(16, 4096, 14336)]
    assert tl_lin.choose(3, 2048, 2048) == tl_lin.TABLE[(8, 2048, 2048)]  # 16-row tile: rows not rounded down
    assert tl_lin.choose(20, 3072, 2048) is None and tl_lin.choose(33, 2048, 2048) is None
    w = rand(16, 64, dtype=torch.float16)
    for rows, bad, message in [(3, tl_lin.Config(16, 8, 32, split=2), "powers of two of at least 16"),
                               (17, tl_lin.Config(16, 16, 32, split=2), "covers at most 16 rows, x has 17")]:
        try:
            tl_lin.launch(rand(rows, 64, dtype=torch.float16), w, None, bad)
        except ValueError as e:
            assert message in str(e), e
        else:
            raise AssertionError(f"{bad} accepted {rows} rows")
    configs = [tl_lin.Config(16, 16, 32, 4, 1, split=3), tl_lin.Config(32, 16, 16, 4, 1, split=4, swap=True),
               tl_lin.Config(16, 32, 32, 4, 1, split=1, swap=True), tl_lin.Config(32, 32, 16, 4, 1, split=1)]
    for i, (m, n, k) in enumerate([(2, 40, 100), (3, 33, 64), (7, 16, 48), (9, 50, 130), (17, 24, 80),
                                   (31, 20, 36), (32, 18, 70)]):
        for config in configs:
            if m > config.block_m:
                continue
            dtype = torch.float16  # Triton 3.6's interpreter gets tl.dot on bfloat16 wrong (any dot kernel)
            x, w = rand(m, k, dtype=dtype, seed=i), rand(n, k, dtype=dtype, seed=i + 10) * 0.1
            b = rand(n, dtype=dtype, seed=i + 20) if i % 3 == 0 else None
            out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned: every element must be written
            tl_lin.launch(x, w, b, config, out=out)
            assert rel_err(out, x, w, b) < 5e-3, (m, n, k, config)
            assert arrival_counters.counters_idle(), (m, n, k, config)
            again = tl_lin.launch(x, w, b, config)
            assert torch.equal(again, out), (m, n, k, config)


@needs_triton
def test_split_k_kernel_under_triton_interpreter():
    run_under_triton_interpreter("tests.test_linear_small_m")


def hopper_compile_checks() -> None:
    """Run by the test below without the interpreter: compile the kernel for an H100/H200 (sm_90) ahead of time, no
    GPU needed, in the variants the launches take (swap-AB or not, one split or several, bias or not, K a multiple
    of the K step or not). The interpreter runs the kernel as Python, so it accepts code Triton's compiler rejects
    (a bias helper did, once)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from fxpasses.ops import triton_linear as tl_lin

    kernel = tl_lin._split_k_kernel
    ints = ("M", "N", "K", "sxm", "swn", "som", "k_per_split")
    signature = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "OUT": "*bf16", "WS": "*fp32", "CNT": "*i32",
                 **{a: "i32" for a in ints}}
    aligned = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in signature if a != "M"}
    for swap, splits, bias, even in [(True, 3, True, False), (False, 1, True, True), (True, 1, False, True),
                                     (False, 4, False, False)]:
        const = dict(HAS_BIAS=bias, EVEN_K=even, SPLITS=splits, SWAP=swap, BLOCK_M=16, BLOCK_N=64 if swap else 16,
                     BLOCK_K=128)
        src = ASTSource(kernel, {**signature, **{k: "constexpr" for k in const}}, const, aligned)
        compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
        ptx = compiled.asm["ptx"]
        assert ("wgmma" in ptx) == swap, (swap, splits)  # swap-AB: Hopper's warpgroup MMA on the weight tile
        if splits > 1:  # one acq_rel ticket per program, after the CTA barrier that orders the partial stores
            assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx, (swap, splits)


@needs_triton
def test_split_k_kernel_compiles_for_hopper():
    run_under_triton_interpreter("tests.test_linear_small_m", "hopper_compile_checks", interpret=False)


# ---- GPU ------------------------------------------------------------------------------------------------------
def _configs(m: int):
    from fxpasses.ops import triton_linear as tl_lin

    bm = 16 if m <= 16 else 32
    return [tl_lin.Config(bm, 64, 256, 4, 4, split=8, swap=True), tl_lin.Config(bm, 32, 256, 4, 4, split=3),
            tl_lin.Config(bm, 128, 128, 4, 3, split=1, swap=True)]


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k,dtype,bias", [(2048, 2048, torch.bfloat16, False), (1000, 300, torch.float16, True),
                                            (24, 4104, torch.bfloat16, True), (4097, 1000, torch.bfloat16, False)],
                         ids=["llama_2048", "odd_1000x300_fp16_bias", "narrow_24x4104_bias", "odd_4097x1000"])
def test_split_k_matches_float64_and_cublas_and_repeats_bit_for_bit(n, k, dtype, bias):
    """Odd shapes: N not a multiple of any column block (1000, 24, 4097), K not a multiple of the K step (300,
    4104, 1000), every row count of ROWS."""
    from fxpasses.ops import triton_linear as tl_lin
    from fxpasses.ops import arrival_counters

    w = rand(n, k, dtype=dtype, seed=1, device="cuda") * 0.05
    b = rand(n, dtype=dtype, seed=2, device="cuda") if bias else None
    for m in ROWS:
        x = rand(m, k, dtype=dtype, seed=m, device="cuda")
        cublas = F.linear(x, w, b)
        for config in _configs(m):
            out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # every element must be written
            tl_lin.launch(x, w, b, config, out=out)
            assert rel_err(out, x, w, b) < 5e-3, (m, config)
            torch.testing.assert_close(out, cublas, rtol=2e-2, atol=2e-2)
            for _ in range(3):  # whichever program arrives last, the partials are summed in one order
                assert torch.equal(tl_lin.launch(x, w, b, config), out), (m, config)
    torch.cuda.synchronize()
    assert arrival_counters.counters_idle()


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [3, 32])
def test_split_k_in_a_cuda_graph_replays_with_the_counters_reset(m):
    """Captured with several splits and replayed twice on new inputs: equal bit for bit to eager launches (the
    counters the capture's launches took are back at zero after each replay)."""
    from fxpasses.ops import triton_linear as tl_lin
    from fxpasses.ops import arrival_counters

    n, k = 2048, 4096
    w = rand(n, k, seed=1, device="cuda") * 0.05
    b = rand(n, seed=2, device="cuda")
    configs = _configs(m)[:2]
    static = rand(m, k, device="cuda")
    for c in configs:
        tl_lin.launch(static, w, b, c)  # compile, and the counter ring, outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [tl_lin.launch(static, w, b, c) for c in configs for _ in range(2)]
    for seed in (5, 6):
        new = rand(m, k, seed=seed, device="cuda")
        static.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        assert arrival_counters.counters_idle()
        for i, c in enumerate(configs):
            eager = tl_lin.launch(new, w, b, c)
            assert torch.equal(outs[2 * i], eager) and torch.equal(outs[2 * i + 1], eager), (seed, c)
            assert rel_err(eager, new, w, b) < 5e-3


@gpu
@needs_cuda
def test_op_runs_the_table_choice_at_two_to_thirty_two_rows():
    """Where the table names the split-K kernel for a Llama shape, fxp.linear equals that launch bit for bit;
    elsewhere it is cuBLAS bit for bit."""
    from fxpasses.ops import triton_linear as tl_lin

    for n, k in [(2048, 2048), (3072, 2048), (4096, 4096), (2048, 8192)]:
        w = rand(n, k, seed=1, device="cuda") * 0.05
        for m in ROWS:
            x = rand(m, k, seed=m, device="cuda")
            out = fxp.linear(x, w)
            c = tl_lin.choose(m, n, k)
            want = F.linear(x, w) if c is None else tl_lin.launch(x, w, None, c)
            assert torch.equal(out, want), (m, n, k, c)
            assert rel_err(out, x, w) < 5e-3


CAPTURED_FIRST = """
import json, logging, torch
from fxpasses.ops import triton_linear as tl_lin
from fxpasses.ops import arrival_counters
records = []
logging.getLogger(tl_lin.__name__).addHandler(logging.Handler())
logging.getLogger(tl_lin.__name__).handlers[-1].emit = records.append
w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) * 0.05
x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
one = tl_lin.Config(16, 64, 256, 4, 3, split=1, swap=True)
eager = tl_lin.launch(x, w, None, one)  # compiles the unsplit kernel; no counters exist yet
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    out = tl_lin.launch(x, w, None, tl_lin.Config(16, 64, 256, 4, 3, split=8, swap=True))
g.replay()
torch.cuda.synchronize()
print(json.dumps({"equal": torch.equal(out, eager), "idle": arrival_counters.counters_idle(),
                  "warned": any("inside a CUDA-graph capture" in r.getMessage() for r in records)}))
"""


@gpu
@needs_cuda
def test_split_k_first_used_inside_a_capture_runs_unsplit():
    """No counter buffer can be made inside a capture (it would be zeroed only at replay): a process whose first
    split-K call is captured runs it with one split, equal to the eager unsplit launch, and logs why."""
    assert run_fresh_process(CAPTURED_FIRST) == {"equal": True, "idle": True, "warned": True}
