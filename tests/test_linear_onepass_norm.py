"""The one-pass RMSNorm prologue of the fused 1-token GEMV (``NORM_ONE_PASS`` in ``ops/triton_linear.py``).

``RMSNorm(h) . W^T = rstd * (W . (g * h))``: the kernel accumulates the dot product and the row's sum of squares in
the same K walk and applies rstd once at the end, so it is not bit-identical to the norm kernel followed by the
GEMV (eager rounds the normalized row to the dtype first); it differs by rounding order only. So the checks are:
the result within the GEMV's relative error of a float64 reference and within bf16 GEMM tolerance of the unfused
kernels, every output element written (poisoned buffers), and the residual sum ``x + r`` bit for bit (it is
eager's add).

CPU, under Triton's interpreter (where Triton is installed, or its site directory is in FXPASSES_TRITON_SITE, as
tests/test_linear.py runs it): small odd shapes (K not a multiple of the K step, N not a multiple of the column
block), with and without the residual, with and without SiLU-and-mul, one program per block and a persistent
grid; the policy (``fused_config``: NORM_ONE_PASS and ``FXPASSES_UNFUSED_GEMV=onepass``); and an ahead-of-time
compile of the kernel's variants for sm_90 (the interpreter runs the kernel as Python and accepts code the compiler
rejects). GPU (marked): the Llama-3.2-1B / Llama-3-8B (and TP 2) shapes against float64 and the unfused kernels,
and the ops with the one-pass prologue forced, captured once in a CUDA graph and replayed.
"""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from pattern_helpers import needs_triton, run_under_triton_interpreter

from fxpasses import ops  # noqa: F401  (registers the fxp ops)

fxp = torch.ops.fxp
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
EPS = 1e-5


def rand(*shape, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def operands(n, k, dtype, device="cpu", scale=0.05):
    """x, residual, norm weight, gate and up weights of one decode row."""
    x, r = rand(1, k, dtype=dtype, device=device), rand(1, k, dtype=dtype, seed=1, device=device)
    nw = (1 + 0.1 * rand(k, dtype=torch.float32, seed=2)).to(dtype).to(device)
    gate, up = (rand(n, k, dtype=dtype, seed=s, device=device) * scale for s in (3, 4))
    return x, r, nw, gate, up


def reference(h, nw, gate, up=None):
    """float64: RMSNorm of the (already rounded) row h, then the projection (and silu(gate) * up)."""
    hd = h.double()
    normed = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + EPS) * nw.double()
    y = F.linear(normed, gate.double())
    return F.silu(y) * F.linear(normed, up.double()) if up is not None else y


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def unfused(x, r, nw, gate, up=None):
    """The kernels the unfused graph runs: (add +) norm, projection(s) (and fxp.silu_and_mul)."""
    normed = fxp.add_rms_norm(x, r, nw, EPS)[0] if r is not None else fxp.rms_norm(x, nw, EPS)
    if up is None:
        return fxp.linear(normed, gate)
    return fxp.silu_and_mul(fxp.linear(normed, gate), fxp.linear(normed, up))


def close_as_gemms(got, want, rtol, atol, what):
    """Within GEMM tolerance of the unfused kernels, with ``atol`` relative to the output's RMS. Why relative: the
    unfused sequence rounds the normalized row to the dtype before its GEMM, which moves each output by about
    ``0.0016 * sqrt(K) * |w| * |a|`` (0.005 at K = 4096 with weights of 0.05, the scale these tests share with
    tests/test_linear.py), a few of 6144 elements past an absolute 2e-2; measured (GPU and a float32 emulation) at
    most 0.82% of the RMS apart, and the one-pass result the one closer to float64 (checked beside)."""
    scale = want.float().pow(2).mean().sqrt().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def check_one_pass(tl_lin, config, x, r, nw, gate, up, *, ref_tol, silu_tol, gemm_tol, exact_store):
    """One launch of the one-pass prologue (``r``: with the residual; ``up``: with SiLU-and-mul) into a poisoned
    output: within ``ref_tol`` (``silu_tol``) of float64 and, at Llama widths, no farther from it than the unfused
    kernels; the residual sum bit for bit; a projection within GEMM tolerance of the unfused kernels; SiLU-and-mul
    exactly ``fxp.silu_and_mul`` of the gate and up projections the same tile computes, each within GEMM tolerance
    of the unfused GEMM (``exact_store``: the dtype conversion rounds; Triton's interpreter truncates to bf16)."""
    n = gate.shape[0]
    poisoned = torch.full((1, n), float("nan"), dtype=x.dtype, device=x.device)  # every element must be written
    y, h = tl_lin.launch_fused(x, gate, config, norm_weight=nw, eps=EPS, residual=r, up_weight=up, out=poisoned)
    what = (str(config), r is not None, up is not None, tuple(gate.shape))
    assert y is poisoned and not y.isnan().any(), what
    if r is not None:
        assert torch.equal(h, x + r), what  # eager's add, bit for bit
        assert torch.equal(h, fxp.add_rms_norm(x, r, nw, EPS)[1]), what
    else:
        assert h is None
    row = x + r if r is not None else x
    ref = reference(row, nw, gate, up)
    want = unfused(x, r, nw, gate, up)
    err, err_unfused = rel(y, ref), rel(want, ref)
    assert err < (silu_tol if up is not None else ref_tol), (what, err)
    if exact_store and n >= 2048:  # fewer roundings than the unfused sequence: closer to float64 (a statistical
        assert err <= err_unfused, (what, err, err_unfused)  # property: over thousands of outputs, not 13)
    if up is None:
        close_as_gemms(y, want, **gemm_tol, what=what)
        return
    # the epilogue on the one-pass projections (stored in float32 and rounded by torch, as the kernel rounds them)
    normed = fxp.add_rms_norm(x, r, nw, EPS)[0] if r is not None else fxp.rms_norm(x, nw, EPS)
    halves = []
    for w in (gate, up):
        wide = torch.empty((1, n), dtype=torch.float32, device=x.device)
        p = tl_lin.launch_fused(x, w, config, norm_weight=nw, eps=EPS, residual=r, out=wide)[0].to(x.dtype)
        close_as_gemms(p, fxp.linear(normed, w), **gemm_tol, what=what)
        halves.append(p)
    if exact_store:
        assert torch.equal(y, fxp.silu_and_mul(*halves)), what
    else:  # the final store truncates here: within one bf16 step
        torch.testing.assert_close(y, fxp.silu_and_mul(*halves), rtol=2 ** -7, atol=1e-6)


# ---- Triton's interpreter (CPU) ---------------------------------------------------------------------------------
def interpreter_checks() -> None:
    """Run by the test below in a process with TRITON_INTERPRET=1 (the interpreter must be on when the kernels are
    defined). The interpreter casts float32 to bfloat16 by truncation, not rounding, so the final bf16 store is up
    to one bf16 step low here: the float64 bound for bf16 is 1e-2 (5e-3 on the GPU, and here in float16)."""
    from fxpasses.ops import triton_linear as tl_lin

    one = dict(one_pass=True)
    full = [(residual, silu) for residual in (True, False) for silu in (False, True)]
    cases = [(torch.float16, (13, 37), tl_lin.Config(1, 4, 16, 1, 1, **one), full),  # K, N not multiples of the tile
             (torch.bfloat16, (10, 100), tl_lin.Config(1, 8, 64, 2, 1, **one), full),
             (torch.float16, (16, 64), tl_lin.Config(1, 8, 32, 2, 1, **one), [(True, True)]),  # EVEN: unmasked loads
             (torch.bfloat16, (11, 24), tl_lin.Config(1, 2, 32, 1, 1, programs=1, **one),  # persistent: 4 programs
              [(True, False), (True, True)])]  # walking 6 column blocks, one K step covering the row
    for dtype, (n, k), config, variants in cases:
        x, r, nw, gate, up = operands(n, k, dtype)
        bf16 = dtype == torch.bfloat16
        tols = dict(ref_tol=1e-2 if bf16 else 5e-3, silu_tol=2e-2, exact_store=not bf16,
                    gemm_tol=dict(rtol=2e-2, atol=2e-2 if bf16 else 2e-3))
        for residual, silu in variants:
            check_one_pass(tl_lin, config, x, r if residual else None, nw, gate, up if silu else None, **tols)
    # without the norm the flag changes nothing: the plain fused GEMV, bit for bit; and the two-pass prologue is
    # still what one_pass=False selects (the norm kernel's row exactly, through an identity projection)
    dtype, (n, k), config, _ = cases[0]
    x, r, nw, gate, up = operands(n, k, dtype)
    plain = dataclasses.replace(config, one_pass=False)
    assert torch.equal(tl_lin.launch_fused(x, gate, config, up_weight=up)[0],
                       tl_lin.launch_fused(x, gate, plain, up_weight=up)[0])
    y, h = tl_lin.launch_fused(x, torch.eye(k, dtype=dtype), plain, norm_weight=nw, eps=EPS, residual=r)
    assert torch.equal(y, fxp.add_rms_norm(x, r, nw, EPS)[0]) and torch.equal(h, x + r)
    assert "onepass" in str(tl_lin.Config(1, 4, 1024, 4, 1, one_pass=True))
    policy_checks(tl_lin)


def policy_checks(tl_lin) -> None:
    """``fused_config``: NORM_ONE_PASS's shapes get its tile with the one-pass prologue; ``FXPASSES_UNFUSED_GEMV=
    onepass`` forces it for every norm op (even rows the two-pass prologue cannot hold), ``1`` turns every fused
    op off, ``norm`` forces the two-pass prologue and ``twopass`` keeps the policy before NORM_ONE_PASS (both
    ignore it); ops without the norm never get the flag. The measured table: the qkv projections of 1B, 8B and 8B at TP 2 (not gate_up + SiLU: it lost)."""
    env = tl_lin.ENV_OFF
    saved = os.environ.pop(env, None)
    shapes = [(False, 3072, 2048), (True, 8192, 2048), (False, 6144, 4096), (True, 14336, 4096), (False, 3072, 4096),
              (True, 7168, 4096), (False, 512, 16384)]
    try:
        for silu, n, k in shapes:
            key = ("silu" if silu else "norm", n, k)
            c = tl_lin.fused_config(1, n, k, silu_mul=silu, norm=True)
            if key in tl_lin.NORM_ONE_PASS:
                assert c == dataclasses.replace(tl_lin.NORM_ONE_PASS[key], one_pass=True), key
            elif key in tl_lin.NORM_FUSED:
                assert c is not None and not c.one_pass, key
            else:
                assert c is None, key
            assert not tl_lin.fused_config(1, n, k, silu_mul=silu).one_pass  # no norm: no prologue
            os.environ[env] = "onepass"
            forced = tl_lin.fused_config(1, n, k, silu_mul=silu, norm=True)
            assert forced is not None and forced.one_pass, key
            assert tl_lin.fused_config(8, n, k, silu_mul=silu, norm=True) is None  # one token only
            os.environ[env] = "1"
            assert tl_lin.fused_config(1, n, k, silu_mul=silu, norm=True) is None
            os.environ[env] = "norm"
            trial = tl_lin.fused_config(1, n, k, silu_mul=silu, norm=True)
            assert trial is None or not trial.one_pass, key  # the two-pass design, for A/B
            os.environ[env] = "twopass"  # the policy before NORM_ONE_PASS
            before = tl_lin.fused_config(1, n, k, silu_mul=silu, norm=True)
            assert (before is not None) == (key in tl_lin.NORM_FUSED) and not (before and before.one_pass), key
            del os.environ[env]
        assert tl_lin.fused_config(1, 512, 16384, silu_mul=False, norm=True) is None  # above MAX_NORM_K, two-pass
        assert all(c.block_m == 1 and not c.programs and not c.split for c in tl_lin.NORM_ONE_PASS.values())
    finally:
        os.environ.pop(env, None)
        if saved is not None:
            os.environ[env] = saved


@needs_triton
def test_one_pass_prologue_under_triton_interpreter():
    run_under_triton_interpreter("tests.test_linear_onepass_norm")


def hopper_compile_checks() -> None:
    """Run by the test below without the interpreter: compile ``_fused_gemv_kernel`` for an H100/H200 (sm_90) ahead
    of time, no GPU needed, with the one-pass prologue (residual or not, SiLU-and-mul or not, EVEN or not,
    persistent or not), the two-pass prologue beside it, and the plain ``_gemv_kernel`` that shares the body."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from fxpasses.ops import triton_linear as tl_lin

    def build(kernel, pointers, ints, floats, const):
        signature = {**{a: "*bf16" for a in pointers}, **{a: "i32" for a in ints}, **{a: "fp32" for a in floats}}
        aligned = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in (*pointers, *ints)}
        src = ASTSource(kernel, {**signature, **{c: "constexpr" for c in const}}, const, aligned)
        return triton_compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))

    pointers, ints = ("X", "R", "NW", "W", "W2", "OUT", "ROUT"), ("N", "K", "sxm", "srm", "srom", "swn", "som")
    for one_pass, residual, silu, even, persistent in [(True, True, True, True, False), (True, True, False, False, True),
                                                       (True, False, False, True, False), (False, True, True, True, False)]:
        const = dict(NORM=True, NORM_ONE_PASS=one_pass, HAS_RESIDUAL=residual, SILU_MUL=silu, EVEN=even, BLOCK_N=4,
                     BLOCK_K=512, BLOCK_ROW=1 if one_pass else 2048, ROW_IN_REGS=False, PERSISTENT=persistent)
        ptx = build(tl_lin._fused_gemv_kernel, pointers, ints, ("eps",), const).asm["ptx"]
        assert ("sqrt" in ptx or "rsqrt" in ptx), const  # rstd: computed in the kernel either way
    build(tl_lin._gemv_kernel, ("X", "W", "B", "OUT"), ("N", "K", "sxm", "swn", "som"), (),
          dict(HAS_BIAS=False, EVEN=True, BLOCK_N=4, BLOCK_K=1024))


@needs_triton
def test_one_pass_prologue_compiles_for_hopper():
    run_under_triton_interpreter("tests.test_linear_onepass_norm", "hopper_compile_checks", interpret=False)


# ---- GPU ------------------------------------------------------------------------------------------------------
# (activation / projection width, K, SiLU-and-mul, dtype): Llama-3.2-1B qkv and gate_up (its 8192-wide halves),
# Llama-3-8B qkv and gate_up, both at TP 2 (bf16, as the models run), and odd shapes (N not a multiple of any tile,
# K not a multiple of 16) in both dtypes. Few tiles each: every (tile, flags) pair is a compile of its own.
GPU_SHAPES = [(3072, 2048, False, torch.bfloat16), (8192, 2048, True, torch.bfloat16),
              (6144, 4096, False, torch.bfloat16), (14336, 4096, True, torch.bfloat16),
              (3072, 4096, False, torch.bfloat16), (7168, 4096, True, torch.bfloat16),
              (37, 4104, False, torch.float16), (1000, 300, True, torch.bfloat16)]


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k,silu,dtype", GPU_SHAPES)
def test_one_pass_prologue_matches_float64_and_the_unfused_kernels(n, k, silu, dtype, monkeypatch):
    """The tile ``FXPASSES_UNFUSED_GEMV=onepass`` picks (the GEMV's), one of the search's with pipelined loads, and
    a persistent grid, each with and without the residual."""
    from fxpasses.ops import triton_linear as tl_lin

    monkeypatch.setenv(tl_lin.ENV_OFF, "onepass")
    forced = tl_lin.fused_config(1, n, k, silu_mul=silu, norm=True)
    assert forced is not None and forced.one_pass
    configs = {forced, tl_lin.Config(1, 4, 512, 4, 3, one_pass=True)}
    if n < 2000:  # odd shapes: a persistent grid too (the residual stored by whichever program walks block 0)
        configs.add(tl_lin.Config(1, 2, 256, 4, 2, programs=1, one_pass=True))
    x, r, nw, gate, up = operands(n, k, dtype, device="cuda")
    tols = dict(ref_tol=5e-3, silu_tol=1e-2, exact_store=True,
                gemm_tol=dict(rtol=2e-2, atol=2e-2 if dtype == torch.bfloat16 else 2e-3))
    for c in configs:
        for residual in (r, None):
            check_one_pass(tl_lin, c, x, residual, nw, gate, up if silu else None, **tols)


@gpu
@needs_cuda
def test_ops_with_the_one_pass_prologue_replay_in_a_cuda_graph(monkeypatch):
    """The three norm ops through their CUDA entry points with ``FXPASSES_UNFUSED_GEMV=onepass`` (1B shapes, bf16):
    one fused launch each, captured once in a CUDA graph; outputs poisoned before every replay; replays equal fresh
    calls bit for bit, the unfused kernels within tolerance, the residual sum eager's add bit for bit."""
    from fxpasses.ops import triton_linear as tl_lin

    dtype = torch.bfloat16
    monkeypatch.setenv(tl_lin.ENV_OFF, "onepass")
    k, i = 2048, 8192
    _, _, nw, wqkv, _ = operands(3072, k, dtype, device="cuda")
    wgu = rand(2 * i, k, dtype=dtype, seed=5, device="cuda") * 0.05
    tol = dict(rtol=2e-2, atol=2e-2)

    def step(x, r):
        y1 = fxp.rms_norm_linear(x, nw, EPS, wqkv)
        y2, h2 = fxp.add_rms_norm_linear(x, r, nw, EPS, wqkv)
        y3, h3 = fxp.add_rms_norm_linear_silu_mul(x, r, nw, EPS, wgu)
        return y1, y2, h2, y3, h3

    static_x, static_r = rand(1, k, dtype=dtype, seed=7, device="cuda"), rand(1, k, dtype=dtype, seed=8, device="cuda")
    step(static_x, static_r)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static_x, static_r)
    for seed in (11, 12):
        new_x, new_r = rand(1, k, dtype=dtype, seed=seed, device="cuda"), rand(1, k, dtype=dtype, seed=seed + 10,
                                                                               device="cuda")
        static_x.copy_(new_x)
        static_r.copy_(new_r)
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        fresh = step(new_x, new_r)
        for got, want in zip(outs, fresh):
            assert torch.equal(got, want)
        y1, y2, h2, y3, h3 = outs
        normed, h_ref = fxp.add_rms_norm(new_x, new_r, nw, EPS)
        assert torch.equal(h2, new_x + new_r) and torch.equal(h2, h_ref) and torch.equal(h3, h_ref)
        close_as_gemms(y1, fxp.linear(fxp.rms_norm(new_x, nw, EPS), wqkv), **tol, what="rms_norm_linear")
        close_as_gemms(y2, fxp.linear(normed, wqkv), **tol, what="add_rms_norm_linear")
        assert rel(y2, reference(h_ref, nw, wqkv)) < 5e-3
        # SiLU-and-mul: against float64, and no farther from it than the unfused kernels (check_one_pass compares
        # the gate and up products themselves with the unfused GEMM)
        ref = reference(h_ref, nw, wgu[:i], wgu[i:])
        unfused_silu = fxp.silu_and_mul(*fxp.linear(normed, wgu).split([i, i], dim=-1))
        assert rel(y3, ref) < 1e-2 and rel(y3, ref) <= rel(unfused_silu, ref)
    # the policy without the variable: NORM_ONE_PASS's shapes with its tile (1B qkv runs one-pass iff it is listed)
    monkeypatch.delenv(tl_lin.ENV_OFF)
    c = tl_lin.fused_config(1, 3072, k, silu_mul=False, norm=True)
    listed = ("norm", 3072, k) in tl_lin.NORM_ONE_PASS
    assert (c is not None and c.one_pass) == listed
    if listed:
        x = rand(1, k, dtype=dtype, seed=13, device="cuda")
        assert torch.equal(fxp.rms_norm_linear(x, nw, EPS, wqkv), tl_lin.launch_fused(x, wqkv, c, norm_weight=nw, eps=EPS)[0])
