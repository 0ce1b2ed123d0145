"""GPU: small-token GEMMs (``y = x @ W.T``, bf16) at every projection shape of Llama-3.2-1B and Llama-3-8B.

    python benchmarks/gemm.py [--m 1 8 32] [--models 1b 8b] [--sweep [--kernels split] [--quick] [--jobs N]]
                              [--shapes NAME ...] [--out DIR]

For each shape and token count M: cuBLAS (``F.linear``), ``fxp.linear`` (what the op picks: the Triton kernel
where ``ops/triton_linear.py``'s table names the shape, else cuBLAS), in GB/s of the bytes a call must move
(weight + x + y) and as a share of the copy bandwidth measured in the same run (read + write of 1 GiB).

Timing: a decode step reads each weight once and the weights of a step far exceed the L2 cache, so each timing
cycles through enough distinct copies of the weight to cover 512 MB (a 2 MB projection would otherwise be read
from L2), all calls captured in one CUDA graph (as in a captured decode step: no launch path), replayed, and the
median replay divided by the number of calls.

``--sweep`` times every candidate tile of the Triton kernels as well, checks each against a float64 reference,
and prints the best per (M bucket, N, K) as the Python literal ``ops/triton_linear.py`` keeps as ``TABLE`` (only
where it beats cuBLAS by 2%: after each shape as it goes, and all together at the end); ``--out`` gets the full
results as JSON. At 2..32 rows the candidates include the split-K kernel's tiles, each with the K splits that
give 1, 2 and 4 programs per SM (``--kernels split``: only those; ``--quick``: fewer tiles; ``--jobs N``: compile
them first in N processes, ``--compile-only`` then stops; ``--shapes qkv o ...``: only those projections). After
every shape the split-K arrival counters must be back at zero.

``--fused`` times the fused decode ops at one token instead, each against the kernels it replaces, all in one
CUDA graph per row the same way (norm weight, residual and activations are tiny next to the weight):

- ``qkv``: ``add_rms_norm`` + ``fxp.linear`` (cuBLAS, and the Triton GEMV where the table has it) vs the fused
  kernel with the norm prologue, and ``fxp.add_rms_norm_linear`` as its policy chooses (fused or not);
- ``gate_up``: ``add_rms_norm`` + the projection + ``silu_and_mul`` vs ``add_rms_norm`` + ``fxp.linear_silu_mul``
  vs the fully fused kernel, and ``fxp.add_rms_norm_linear_silu_mul`` as chosen;

at Llama-3.2-1B's and Llama-3-8B's shapes and at TP 2 shards of 8B (``--fused-tiles`` then times other tiles of
the fused kernel, persistent grids among them, to choose the prologue's tile). Both rows time the fused kernel
with the two-pass norm prologue ("fused kernel") and with the one-pass prologue at the same tile ("one-pass
kernel", ``Config.one_pass``). ``--onepass-tiles`` then searches the one-pass kernel's tile at each shape (column
blocks 2-16, K steps 256-2048, 2/4/8 warps: ``ONEPASS_SPACE``; compiled first in ``--jobs`` processes, 16 by
default; ``--compile-only`` then stops), checks each against the unfused kernels, and prints the best tile with
its ``NORM_ONE_PASS`` entry for ``ops/triton_linear.py`` (marked "leave out" unless it beats the best of the unfused
pairs and the two-pass kernel by at least 2%).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.testing

from fxpasses import ops  # noqa: F401  (registers fxp.linear)
from fxpasses.ops import arrival_counters
from fxpasses.ops import triton_linear as tl_lin

SHAPES = {  # name -> (N, K): weight [N, K] as nn.Linear stores it; qkv and gate_up fused as fxpasses.models does
    "1b": {"qkv": (3072, 2048), "q": (2048, 2048), "k|v": (512, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
           "gate|up": (8192, 2048), "down": (2048, 8192), "lm_head": (128256, 2048)},
    "8b": {"qkv": (6144, 4096), "q": (4096, 4096), "k|v": (1024, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
           "gate|up": (14336, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)},
}
ROTATE_BYTES = 512 << 20


@dataclass
class Row:
    model: str
    name: str
    m: int
    n: int
    k: int
    cublas_us: float
    op_us: float
    op_config: str
    best_us: float | None = None
    best_config: str | None = None


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=100) / 1e6


def graph_time_us(fn, weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """Per-call time of ``fn(x, w)`` over every weight copy, captured in one CUDA graph, median of replays."""
    outs = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for w in weights[:2]:
            fn(x, w)  # compile / pick algorithms outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in weights:
            outs.append(fn(x, w))
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    del g, outs
    return times[len(times) // 2] * 1e3 / len(weights)


# (swap, block_n, block_k, num_warps, num_stages) of the split-K kernel: column blocks of 16-32 (mma.sync, x the
# A operand) or 64-128 (swap-AB: the weight tile is the A operand, Hopper's warpgroup MMA), K steps and stages
# that keep 64-128 KB of weight loads in flight per SM within its 228 KB of shared memory
SPLIT_TILES = [(False, 16, 512, 4, 4), (False, 16, 256, 4, 6), (False, 32, 256, 4, 4), (False, 32, 512, 4, 3),
               (True, 64, 256, 4, 3), (True, 64, 128, 4, 5), (True, 128, 128, 4, 3), (True, 64, 512, 4, 2),
               (False, 16, 1024, 4, 3), (False, 16, 512, 8, 4)]
SPLIT_WAVES = (1, 2, 4)  # K splits that give about this many programs per SM (at least 1 split)


def split_candidates(m: int, n: int, k: int, quick: bool = False, sms: int = 132) -> list[tl_lin.Config]:
    """Split-K tiles for M rows at [N, K]: each tile with the split counts that give every SM about
    ``SPLIT_WAVES`` programs (``split_plan`` trims them to whole K steps; duplicates dropped). ``quick``: the
    first six tiles."""
    bm = 16 if m <= 16 else 32
    out: list[tl_lin.Config] = []
    for swap, bn, bk, w, st in SPLIT_TILES[:6 if quick else None]:
        tiles = -(-n // bn)
        for waves in SPLIT_WAVES:
            real = tl_lin.split_plan(k, bk, max(1, round(waves * sms / tiles)))[0]
            c = tl_lin.Config(bm, bn, bk, w, st, split=real, swap=swap)
            if c not in out:
                out.append(c)
    return out


def _compile(m: int, configs: list[tl_lin.Config]) -> int:
    """Worker of ``precompile``: one launch of each config at M rows on a small shape with the same
    specialization (dimensions multiples of 16, the config's split count); the number that failed."""
    failed = 0
    for c in configs:
        k = c.split * c.block_k
        try:
            tl_lin.launch(torch.zeros(m, k, device="cuda", dtype=torch.bfloat16),
                          torch.zeros(2 * c.block_n, k, device="cuda", dtype=torch.bfloat16), None, c)
        except Exception:  # out of shared memory: the sweep skips it too
            failed += 1
    torch.cuda.synchronize()
    return failed


def precompile(tasks: dict[int, set[tl_lin.Config]], jobs: int) -> None:
    """Compile the sweep's split-K kernels in ``jobs`` processes first (Triton's on-disk cache then serves the
    sweep): compiling one tile takes seconds, timing it milliseconds."""
    import concurrent.futures
    import multiprocessing

    work = [(m, sorted(cs, key=str)[i::jobs]) for m, cs in tasks.items() for i in range(jobs)]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = sum(pool.map(_compile, *zip(*[w for w in work if w[1]])))
    print(f"precompiled {sum(len(cs) for cs in tasks.values())} split-K kernels in {jobs} processes "
          f"({failed} failed)", flush=True)


def candidates(m: int, n: int = 0, k: int = 0, kernels: str = "all", quick: bool = False) -> list[tl_lin.Config]:
    """Tiles to sweep: enough elements per thread for 16-byte loads, at most ~128 float32 accumulators each; for
    2..32 rows also the split-K kernel's (given the shape; ``kernels="split"``: only those)."""
    if m > 1 and n and k:
        split = split_candidates(m, n, k, quick)
        if kernels == "split":
            return split
        return candidates(m) + split
    if m == 1:
        return [tl_lin.Config(1, bn, bk, w, 1) for bn, bk, w in itertools.product((1, 2, 4, 8), (1024, 2048, 4096),
                                                                                   (2, 4, 8))
                if 256 * w <= bn * bk <= 128 * 32 * w]
    dots = [tl_lin.Config(16 if m <= 16 else 32, bn, bk, w, s)
            for bn, bk, (w, s) in itertools.product((16, 32, 64), (128, 256, 512), ((4, 3), (4, 5), (8, 4)))]
    if m > 8:
        return dots
    rows = triton.next_power_of_2(m)
    return [tl_lin.Config(rows, bn, bk, w, 1) for bn, bk, w in itertools.product((1, 2, 4), (256, 512, 1024),
                                                                                  (2, 4, 8))
            if 256 * w <= bn * bk and rows * bn * bk <= 128 * 32 * w] + dots


def table_entry(bucket: int, n: int, k: int, c: tl_lin.Config, comment: str) -> str:
    """One line of ``TABLE`` as Python source."""
    extra = f", split={c.split}" + (", swap=True" if c.swap else "") if c.split else ""
    return (f"({bucket}, {n}, {k}): Config({c.block_m}, {c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages}"
            f"{extra}),  # {comment}")


def rel_err(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    ref = F.linear(x.double(), w.double())
    return ((out.double() - ref).norm() / ref.norm()).item()


def save(out: str | None, copy: float, rows: list[Row], table: dict) -> None:
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gemm.json"), "w") as f:
        json.dump({"copy_gbs": copy, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": [asdict(r) for r in rows],
                   "table": [[bm, n, k, c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, t]
                             for (bm, n, k), (t, c) in table.items()]}, f, indent=1)


FUSED_SHAPES = {"1b": {"qkv": (3072, 2048), "gate_up": (16384, 2048)},
                "8b": {"qkv": (6144, 4096), "gate_up": (28672, 4096)},
                "8b-tp2": {"qkv": (3072, 4096), "gate_up": (14336, 4096)}}
def other_tiles(k: int) -> list[tl_lin.Config]:
    """Tiles of the fused kernel to time besides the default: column blocks and K steps as the GEMV sweep found
    good, and persistent grids (``programs`` per SM) with the whole row in one step, normalized once per program."""
    row = triton.next_power_of_2(k)
    return ([tl_lin.Config(1, bn, bk, w, 1) for bn, bk, w in
             ((1, 2048, 2), (2, 1024, 2), (2, 2048, 4), (4, 1024, 4), (4, 2048, 8), (8, 1024, 8), (2, row, 8))]
            + [tl_lin.Config(1, bn, row, w, st, programs=p) for bn, w, st, p in
               ((1, 4, 3, 8), (2, 4, 3, 4), (2, 8, 2, 4), (4, 8, 3, 2), (8, 8, 2, 2))])


# num_stages: one value. Triton 3.6's pipeliner leaves this kernel's loads alone (they feed no tl.dot): compiled for
# sm_90, num_stages 1, 2, 3 and 4 give the same PTX (no cp.async), so more values would time the same code again.
# block_n 16: added after the first search (H200, 2026-11-29), whose best tiles sat at its edge, block_n 8, on every
# qkv shape; the gate_up + SiLU shapes lost with every tile of that search (at most 2 * 8 weight rows per program).
ONEPASS_SPACE = dict(block_n=(2, 4, 8, 16), block_k=(256, 512, 1024, 2048), num_warps=(2, 4, 8), num_stages=(1,))


def onepass_candidates(silu_mul: bool) -> list[tl_lin.Config]:
    """The one-pass kernel's tiles to search: ``ONEPASS_SPACE`` with at least 256 and at most 128 float32
    accumulators per thread (``silu_mul``: the program holds gate and up accumulators, twice as many)."""
    rows = 2 if silu_mul else 1
    space = ONEPASS_SPACE
    return [tl_lin.Config(1, bn, bk, w, st, one_pass=True)
            for bn, bk, w, st in itertools.product(space["block_n"], space["block_k"], space["num_warps"],
                                                   space["num_stages"])
            if 256 * w <= rows * bn * bk <= 128 * 32 * w]


def _compile_fused(work: list[tuple[bool, tl_lin.Config]]) -> int:
    """Worker of ``precompile_fused``: one launch of each one-pass tile on a small shape with the same
    specialization as the benchmark's (dimensions and strides multiples of 16, EVEN, the residual); the number
    that failed."""
    failed = 0
    k, n = 2048, 64
    dt = torch.bfloat16
    x, r, nw = (torch.ones(1, k, device="cuda", dtype=dt) for _ in range(3))
    w = torch.zeros(2 * n, k, device="cuda", dtype=dt)
    for silu_mul, c in work:
        try:
            tl_lin.launch_fused(x, w[:n], c, norm_weight=nw[0], eps=1e-5, residual=r,
                                up_weight=w[n:] if silu_mul else None)
        except Exception:  # out of resources: the search skips it too
            failed += 1
    torch.cuda.synchronize()
    return failed


def precompile_fused(work: list[tuple[bool, tl_lin.Config]], jobs: int) -> None:
    """Compile the one-pass search's kernels in ``jobs`` processes first (Triton's on-disk cache serves the
    search): compiling a tile takes a second or two, timing it tens of milliseconds."""
    import concurrent.futures
    import multiprocessing

    start = time.perf_counter()
    chunks = [c for c in (work[i::jobs] for i in range(jobs)) if c]
    with concurrent.futures.ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = sum(pool.map(_compile_fused, chunks))
    print(f"precompiled {len(work)} one-pass kernels in {len(chunks)} processes ({failed} failed) "
          f"[{time.perf_counter() - start:.0f} s]", flush=True)


def onepass_search(model: str, name: str, n: int, k: int, weights: list[torch.Tensor], x: torch.Tensor,
                   kernel, want: torch.Tensor, best_other: tuple[float, str], failures: list[str]) -> None:
    """``--onepass-tiles`` at one shape: every candidate tile checked against the unfused kernels and timed; the
    best printed, with its ``NORM_ONE_PASS`` entry where it beats ``best_other`` (time, what) by 2%."""
    silu_mul = name == "gate_up"
    start = time.perf_counter()
    timed: list[tuple[float, tl_lin.Config]] = []
    for c in onepass_candidates(silu_mul):
        try:
            got = kernel(c)(x, weights[0]).double()
            err = ((got - want).norm() / want.norm()).item()
            if err > 1e-2:
                failures.append(f"one-pass {c} {model} {name}: relative error {err:.2e} against the unfused ops")
                continue
            timed.append((graph_time_us(kernel(c), weights, x), c))
        except Exception as exc:  # out of shared memory or registers for this tile: skip it
            print(f"    skip {c} at {model} {name}: {type(exc).__name__}", flush=True)
    if not timed:
        return
    timed.sort(key=lambda tc: tc[0])
    t, c = timed[0]
    key = ("silu", n // 2, k) if silu_mul else ("norm", n, k)
    print(f"    {model} {name} one-pass best {t:.2f} us {c} ({best_other[0] / t:.2f}x {best_other[1]} "
          f"{best_other[0]:.2f}); next: " + ", ".join(f"{cc} {tt:.2f}" for tt, cc in timed[1:4])
          + f" [{len(timed)} tiles, {time.perf_counter() - start:.0f} s]", flush=True)
    verdict = "" if t < 0.98 * best_other[0] else "  (NOT 2% faster: leave out)"
    print(f"    NORM_ONE_PASS entry: {key}: Config(1, {c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages}, "
          f"one_pass=True),  # {t:.2f} us vs {best_other[0]:.2f} ({best_other[1]}){verdict}", flush=True)


def _fused_shape(model: str, name: str, n: int, k: int, copy: float, tiles: bool, failures: list[str],
                 search: bool = False) -> None:
    """One row of ``--fused`` (or, with ``tiles``, the fused kernel's other tiles at that shape; with ``search``,
    then the one-pass kernel's tile search)."""
    lin, silu, add_norm = torch.ops.fxp.linear, torch.ops.fxp.silu_and_mul, torch.ops.fxp.add_rms_norm
    copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    i = n // 2
    silu_mul = name == "gate_up"
    # the tile the fused kernel gets (whether or not the op's policy fuses the norm at this shape)
    config = tl_lin.fused_config(1, i, k, silu_mul=True) if silu_mul else tl_lin.fused_config(1, n, k, silu_mul=False)

    def kernel(c):
        def run(x, w):
            gate, up = (w[:i], w[i:]) if silu_mul else (w, None)
            return tl_lin.launch_fused(x, gate, c, norm_weight=nw, eps=1e-5, residual=r, up_weight=up)[0]

        return run

    if tiles:
        for c in other_tiles(k):
            if c != config:
                print(f"    {model} {name} tile {c}: {graph_time_us(kernel(c), weights, x):.2f} us", flush=True)
        return
    variants: dict[str, Any] = {}
    if not silu_mul:
        variants["unfused, cuBLAS"] = lambda x, w: F.linear(add_norm(x, r, nw, 1e-5)[0], w)
        variants["unfused, op"] = lambda x, w: lin(add_norm(x, r, nw, 1e-5)[0], w)
        variants["op"] = lambda x, w: torch.ops.fxp.add_rms_norm_linear(x, r, nw, 1e-5, w)[0]
    else:
        def unfused(proj):
            return lambda x, w: silu(*proj(add_norm(x, r, nw, 1e-5)[0], w).split([i, i], dim=-1))

        variants["unfused, cuBLAS"] = unfused(F.linear)
        variants["unfused, op"] = unfused(lin)
        variants["norm + linear_silu_mul"] = lambda x, w: torch.ops.fxp.linear_silu_mul(add_norm(x, r, nw, 1e-5)[0], w)
        variants["op"] = lambda x, w: torch.ops.fxp.add_rms_norm_linear_silu_mul(x, r, nw, 1e-5, w)[0]
    variants["fused kernel"] = kernel(config)
    variants["one-pass kernel"] = kernel(dataclasses.replace(config, one_pass=True))
    variants["GEMV alone"] = lambda x, w: lin(x, w)  # fxp.linear by itself: against docs/performance.md's table
    times = {v: graph_time_us(fn, weights, x) for v, fn in variants.items()}
    want = variants["unfused, cuBLAS"](x, weights[0]).double()
    for v in ("fused kernel", "one-pass kernel", "op"):
        got = variants[v](x, weights[0]).double()
        err = ((got - want).norm() / want.norm()).item()
        if err > 1e-2:
            failures.append(f"{v} {model} {name}: relative error {err:.2e} against the unfused ops")
    best = min(t for v, t in times.items() if v.startswith("unfused"))
    silu_only = f"{times['norm + linear_silu_mul']:.2f}" if silu_mul else "-"
    pairs = [v for v in times if v.startswith("unfused") or v == "norm + linear_silu_mul"]
    best_pair = min(times[v] for v in pairs)
    one = times["one-pass kernel"]
    print(f"| {model} | {name} | {n} x {k} | {times['unfused, cuBLAS']:.2f} | {times['unfused, op']:.2f} | "
          f"{times['fused kernel']:.2f} ({best / times['fused kernel']:.2f}x) | {silu_only} | "
          f"{one:.2f} ({best_pair / one:.2f}x) | {times['op']:.2f} "
          f"({best / times['op']:.2f}x) | {n * k * 2 / times['op'] / 1e3 / copy:.0%} | {config} | "
          f"{times['GEMV alone']:.2f} |", flush=True)
    if search:  # against the best the op could run otherwise: an unfused pair, or the two-pass kernel
        best_other = min([(times[v], v) for v in pairs] + [(times["fused kernel"], "two-pass fused kernel")])
        onepass_search(model, name, n, k, weights, x, kernel, want, best_other, failures)


def fused_rows(models: list[str], copy: float, tiles: bool, search: bool = False, jobs: int = 16,
               compile_only: bool = False) -> None:
    """``--fused``: one-token fused ops against their unfused kernels (see the module docstring); the other tiles
    after every row, the one-pass tile search (``search``) after each row (so a run cut short keeps the rows).
    ``compile_only``: compile the search's kernels in ``jobs`` processes and stop."""
    start = time.perf_counter()
    if search and jobs > 1:
        precompile_fused([(silu, c) for silu in (False, True) for c in onepass_candidates(silu)], jobs)
    if compile_only:
        return
    print("| model | proj | N x K | unfused, cuBLAS us | unfused, op us | fused kernel us (vs best unfused) | "
          "norm + linear_silu_mul us | one-pass kernel us (vs best unfused pair) | op as chosen us (vs best "
          "unfused) | op % copy (weight) | tile | fxp.linear alone us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures: list[str] = []
    chosen = [(m, name, n, k) for m in FUSED_SHAPES if m.split("-")[0] in models
              for name, (n, k) in FUSED_SHAPES[m].items()]
    for phase in ((False, True) if tiles else (False,)):
        for model, name, n, k in chosen:
            _fused_shape(model, name, n, k, copy, phase, failures, search=search and not phase)
            torch.cuda.empty_cache()
    print(f"[fused rows: {time.perf_counter() - start:.0f} s]", flush=True)
    if failures:
        print("\nFAILURES:\n" + "\n".join(failures))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--models", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="time every candidate Triton tile too")
    parser.add_argument("--out", default=None)
    parser.add_argument("--kernels", default="all", choices=["all", "split"],
                        help="with --sweep at M > 1: every kernel's tiles, or only the split-K kernel's")
    parser.add_argument("--quick", action="store_true", help="with --sweep: fewer split-K tiles")
    parser.add_argument("--jobs", type=int, default=0, help="with --sweep: compile the split-K tiles first in "
                        "this many processes")
    parser.add_argument("--compile-only", action="store_true", help="with --jobs: stop after compiling")
    parser.add_argument("--shapes", nargs="+", default=None, help="only these projections (names in SHAPES)")
    parser.add_argument("--fused", action="store_true", help="time the fused decode ops against the unfused kernels")
    parser.add_argument("--fused-tiles", action="store_true", help="with --fused: also time other tiles")
    parser.add_argument("--onepass-tiles", action="store_true", help="with --fused: search the one-pass norm "
                        "prologue's tile at each shape and print NORM_ONE_PASS entries")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy = copy_bandwidth() if not args.compile_only else 0.0
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {copy:.0f} GB/s\n")
    if args.fused:
        fused_rows(args.models, copy, args.fused_tiles, args.onepass_tiles, args.jobs or 16, args.compile_only)
        return
    if args.sweep and args.jobs > 1:
        tasks: dict[int, set[tl_lin.Config]] = {}
        for model in args.models:
            for name, (n, k) in SHAPES[model].items():
                if not args.shapes or name in args.shapes:
                    for m in args.m:
                        if m > 1:
                            tasks.setdefault(m, set()).update(split_candidates(m, n, k, args.quick))
        precompile(tasks, args.jobs)
        if args.compile_only:
            return
    start = time.perf_counter()
    rows: list[Row] = []
    table: dict[tuple[int, int, int], tuple[float, tl_lin.Config]] = {}
    failures: list[str] = []
    for model in args.models:
        for name, (n, k) in SHAPES[model].items():
            if args.shapes and name not in args.shapes:
                continue
            copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                cublas = graph_time_us(F.linear, weights, x)
                chosen = tl_lin.choose(m, n, k)
                op = graph_time_us(torch.ops.fxp.linear, weights, x)
                err = rel_err(torch.ops.fxp.linear(x, weights[0]), x, weights[0])
                if err > 1e-2:
                    failures.append(f"fxp.linear {model} {name} m={m}: relative error {err:.2e}")
                row = Row(model, name, m, n, k, cublas, op, str(chosen) if chosen else "cuBLAS")
                if args.sweep:
                    best: tuple[float, tl_lin.Config] | None = None
                    timed: list[tuple[float, str]] = []
                    for c in candidates(m, n, k, args.kernels, args.quick):
                        try:
                            out = tl_lin.launch(x, weights[0], None, c)
                            e = rel_err(out, x, weights[0])
                            if e > 1e-2:
                                failures.append(f"{c} {model} {name} m={m}: relative error {e:.2e}")
                                continue
                            t = graph_time_us(lambda xx, ww, c=c: tl_lin.launch(xx, ww, None, c), weights, x)
                        except Exception as exc:  # out of shared memory or registers for this tile: skip it
                            print(f"  skip {c} at {name} m={m}: {type(exc).__name__}")
                            continue
                        timed.append((t, str(c)))
                        if best is None or t < best[0]:
                            best = (t, c)
                    if best is not None:
                        row.best_us, row.best_config = best[0], str(best[1])
                        if best[0] < cublas * 0.98:
                            table[(tl_lin._bucket(m), n, k)] = min(table.get((tl_lin._bucket(m), n, k), best),
                                                                   best, key=lambda tc: tc[0])
                            print("    TABLE entry: " + table_entry(tl_lin._bucket(m), n, k, best[1],
                                                                    f"{best[0]:.2f} (cuBLAS {cublas:.2f})"))
                rows.append(row)
                print(f"  {model} {name} m={m}: cuBLAS {cublas:.2f} us, op {op:.2f} us ({row.op_config})"
                      + (f", best {row.best_us:.2f} us ({row.best_config})" if row.best_us else "")
                      + f" [{time.perf_counter() - start:.0f} s]", flush=True)
                if args.sweep:
                    print("    next: " + ", ".join(f"{c} {t:.2f}" for t, c in sorted(timed)[1:4]), flush=True)
            del weights
            torch.cuda.empty_cache()
            if not arrival_counters.counters_idle():
                failures.append(f"split-K arrival counters not zero after {model} {name}")
            save(args.out, copy, rows, table)  # after every shape: a run cut short keeps what it measured

    def gbs(r: Row, us: float) -> float:
        return (r.n * r.k + r.m * r.k + r.m * r.n) * 2 / us / 1e3

    print("\n| model | proj | N x K | M | cuBLAS us | cuBLAS GB/s | % copy | fxp.linear us | GB/s | % copy | "
          "vs cuBLAS | kernel |" + (" best Triton us | % copy |" if args.sweep else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.sweep else ""))
    for r in rows:
        line = (f"| {r.model} | {r.name} | {r.n} x {r.k} | {r.m} | {r.cublas_us:.2f} | {gbs(r, r.cublas_us):.0f} | "
                f"{gbs(r, r.cublas_us) / copy:.0%} | {r.op_us:.2f} | {gbs(r, r.op_us):.0f} | "
                f"{gbs(r, r.op_us) / copy:.0%} | {r.cublas_us / r.op_us:.2f}x | {r.op_config} |")
        if args.sweep:
            line += (f" {r.best_us:.2f} | {gbs(r, r.best_us) / copy:.0%} |" if r.best_us else " - | - |")
        print(line)
    if args.sweep:
        print("\nTABLE = {")
        for (bm, n, k), (t, c) in sorted(table.items()):
            print("    " + table_entry(bm, n, k, c, f"{t:.2f}"))
        print("}")
    if failures:
        print("\nFAILURES:\n" + "\n".join(failures))
    save(args.out, copy, rows, table)


if __name__ == "__main__":
    main()
