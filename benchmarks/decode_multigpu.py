"""Decode step latency of a Llama-shaped model over several GPUs (issue 15): TP2, PP2 (and TP2xPP2 on 4 GPUs), one
process per GPU over NCCL, pipeline sends and receives inside CUDA graphs.

    python benchmarks/decode_multigpu.py [--model 8b|1b] [--layers N] [--tokens 1 8 32] [--layouts tp2 pp2]
    python benchmarks/decode_multigpu.py --tiny --device cpu --backend gloo     # the CPU smoke path (CI)

Each step decodes one token for each of ``tokens`` sequences that already hold ``--context`` cached tokens, as
``benchmarks/decode.py`` does (its batches, shapes and copy-bandwidth probe are imported from there on CUDA). Every
rank builds its stage of the same model once (weights drawn on the GPU, ``FXPASSES_DRAW_WEIGHTS_ON_DEVICE=1``) and
runs the modes one after another, side by side in one run:

- ``eager``: the stage as written, no compile;
- ``fxpasses+full-cudagraphs``: ``Backend(mapping, cuda_graph_sizes=tokens, splitting_ops=())``: the whole stage
  is one CUDA graph per size, ``pp_send``/``pp_recv`` and the TP all_reduces captured inside it over NCCL;
- ``fxpasses+cudagraphs``: piecewise graphs (default splitting ops: attention runs eagerly between pieces);
- ``fxpasses``: ``Backend(mapping)``, no CUDA graphs (the rewritten FX graph runs op by op);
- ``reduce-overhead``: ``torch.compile(stage, mode="reduce-overhead")`` on each stage (Inductor's CUDA graphs).

The Triton and Inductor caches start empty in every run (fresh directories; ``--warm-caches`` keeps the user's), so
compile times are cold starts; within a run, the first fxpasses mode pays pattern tracing and our kernels' Triton
compiles for the later fxpasses modes, which is why the headline mode (full graphs) runs first.

Timing: a step is every stage's forward for one token batch, sends and receives included. Before each timed step
all ranks meet at a barrier (a one-element all_reduce and a device synchronize: no rank can run ahead into the next
step, so a pipeline's stages do not overlap); each rank then times its call up to a device synchronize. A rank's
number is the median over ``--steps`` steps; a layout's number is the largest over its ranks (for PP, the last
stage, which waits for the first). Compile time: per size, the first two calls (the compile and warm-up, then the
CUDA-graph capture) minus two steps, summed over sizes; the largest over ranks; the fxpasses compile cache is off.

Numerics: each compiled mode's last logits at every size are compared with eager's on the same rank (same
weights, inputs and cache); the max abs difference is printed, and a difference above ``--tol`` times the largest
eager logit prints a ``LOGITS MISMATCH`` line. Each fxpasses mode's pattern matches are compared with what the
model config predicts per graph.

NVLink multicast stays off in every process (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

import fxpasses
from fxpasses import Backend, Mapping, init_process_groups
from fxpasses.models import Batch, LlamaConfig, build_model
from fxpasses.testing import NCCL_SAFE_ENVIRONMENT, RankPool, progress

# the headline mode first among ours: the first fxpasses mode in a process pays the one-time costs (pattern tracing,
# our Triton kernels' compiles), which the later ones then find in memory
MODES = ["eager", "fxpasses+full-cudagraphs", "fxpasses+cudagraphs", "fxpasses", "reduce-overhead"]
CUDA_ONLY_MODES = {"fxpasses+full-cudagraphs", "fxpasses+cudagraphs"}
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
# never NVLink multicast (it can take the host's shared GPUs out of service); set in the parent, inherited by ranks
SAFE_ENVIRONMENT = {**NCCL_SAFE_ENVIRONMENT, "NVSHMEM_DISABLE_NVLS": "1"}
MODEL_SHAPES = {"1b": LlamaConfig.llama_3_2_1b, "8b": LlamaConfig.llama_3_8b}  # the same as decode.SHAPES


@dataclass(frozen=True)
class Task:
    """What every rank of one layout runs (picklable: it travels to the ranks)."""

    model: str  # "1b", "8b" or "tiny"
    layers: int | None  # None: the model's own count
    tp: int
    pp: int
    tokens: tuple[int, ...]
    context: int
    modes: tuple[str, ...]
    device: str
    steps: int
    warmup: int
    mark: str
    tol: float
    profile_modes: tuple[str, ...] = ()  # kernel census of these modes at the first token count


@dataclass
class LogitsCheck:
    """A compiled mode's last logits at one size against eager's on the same rank."""

    tokens: int
    max_abs_diff: float
    ref_max_abs: float
    rel_l2: float
    ok: bool


@dataclass
class ModeResult:
    """One mode on one rank."""

    mode: str
    step_ms: list[float] = field(default_factory=list)  # median per size, in ``Task.tokens`` order
    compile_s: float = 0.0
    checks: list[LogitsCheck] = field(default_factory=list)
    graphs: int = 0
    matches: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failure: str | None = None
    census: dict[str, tuple[float, float]] = field(default_factory=dict)  # class -> (kernels, ms) per step


@dataclass
class RankResult:
    rank: int
    tp_rank: int
    pp_rank: int
    is_last_stage: bool
    weight_bytes: int
    kv_bytes: int  # KV cache bytes one sequence's step reads on this rank
    copy_gbps: float  # copy bandwidth measured on this rank (0 on CPU)
    modes: list[ModeResult]


# ---- on each rank ----------------------------------------------------------------------------------------------
def model_config(task: Task) -> LlamaConfig:
    slots, max_len = max(task.tokens), task.context + 8
    if task.model == "tiny":
        config = LlamaConfig(dtype=torch.bfloat16, max_slots=slots, max_len=max_len)
    else:
        config = MODEL_SHAPES[task.model](dtype=torch.bfloat16, max_slots=slots, max_len=max_len)
    return dataclasses.replace(config, num_layers=task.layers) if task.layers else config


def decode_helpers() -> Any:
    """benchmarks/decode.py, imported on CUDA only (it imports triton, which the CPU installs lack)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import decode

    return decode


def decode_step(n: int, context: int, vocab: int, device: str) -> Batch:
    """decode.py's batch (same seed and recipe) on ``device``: on CUDA its own helper."""
    if device == "cuda":
        return decode_helpers().decode_batch(n, context, vocab)
    g = torch.Generator().manual_seed(n)
    return Batch(torch.randint(0, vocab, (n,), generator=g), torch.full((n,), context), torch.arange(n))


def make_fn(mode: str, model: torch.nn.Module, mapping: Mapping, sizes: list[int]) -> tuple[Callable[..., Any], Backend | None]:
    """The callable for a mode, and its fxpasses Backend (None for the modes without one)."""
    torch._dynamo.reset()
    if mode == "eager":
        return model, None
    if mode == "reduce-overhead":
        return torch.compile(model, mode="reduce-overhead"), None
    kwargs: dict[str, Any] = {"cache": False}
    if mode == "fxpasses+full-cudagraphs":
        kwargs.update(cuda_graph_sizes=sizes, splitting_ops=())
    elif mode == "fxpasses+cudagraphs":
        kwargs.update(cuda_graph_sizes=sizes)
    elif mode != "fxpasses":
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    backend = Backend(mapping, **kwargs)
    return torch.compile(model, backend=backend), backend


class Clock:
    """Meets every rank before a step, then times this rank's call up to its device's completion."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.flag = torch.zeros(1, device=device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def barrier(self) -> None:
        dist.all_reduce(self.flag)  # every rank has finished its previous step and no rank starts early
        self.sync()

    def time(self, call: Callable[[], Any]) -> tuple[float, Any]:
        self.barrier()
        t0 = time.perf_counter()
        out = call()
        self.sync()
        return time.perf_counter() - t0, out


BARRIER_CLASS = "NCCL float32 (the barrier between steps, not in the step)"


def kernel_class(name: str) -> str:
    """decode.py's kernel classes, with NCCL's kernels (all_reduce, send, recv) in a class of their own."""
    low = name.lower()
    if "nccl" in low:
        if "f32" in low or "float" in low:  # the model's collectives are bf16; the timing barrier's is float32
            return BARRIER_CLASS
        return "NCCL (" + ("send/recv" if "send" in low or "recv" in low else "all_reduce") + ")"
    return decode_helpers().kernel_class(name)


def census(clock: Clock, call: Callable[[], Any], steps: int = 5) -> dict[str, tuple[float, float]]:
    """Kernels per step by class: (count, GPU ms), over ``steps`` replays under the torch profiler (which records
    the kernels inside CUDA-graph replays), a barrier before each step as in the timing. NCCL time includes any
    wait for the peer (a receive waits for the other stage)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            clock.time(call)
    classes: dict[str, list[float]] = {}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(evt, "self_device_time_total", None)
        us = evt.self_cuda_time_total if us is None else us
        c = classes.setdefault(kernel_class(evt.key), [0.0, 0.0])
        c[0] += evt.count / steps
        c[1] += us / steps / 1e3
    return {k: (n, ms) for k, (n, ms) in sorted(classes.items(), key=lambda kv: -kv[1][1])}


def compare(tokens: int, got: torch.Tensor, ref: torch.Tensor, tol: float) -> LogitsCheck:
    diff = (got.float() - ref.float())
    ref_max = float(ref.float().abs().max())
    max_diff = float(diff.abs().max())
    rel = float(diff.norm() / ref.float().norm().clamp_min(1e-30))
    ok = bool(torch.isfinite(got).all()) and max_diff <= tol * max(ref_max, 1e-30)
    return LogitsCheck(tokens, max_diff, ref_max, rel, ok)


def run_mode(task: Task, mode: str, model: torch.nn.Module, mapping: Mapping, config: LlamaConfig, clock: Clock,
             reference: dict[int, torch.Tensor]) -> ModeResult:
    result = ModeResult(mode)
    fn, backend = make_fn(mode, model, mapping, list(task.tokens))
    with torch.inference_mode():
        for n in task.tokens:
            b = decode_step(n, task.context, config.vocab_size, task.device)
            if task.mark == "unbacked":
                fxpasses.mark_token_dim(b.input_ids, b.position_ids, b.slot_ids)
            else:
                for t in (b.input_ids, b.position_ids, b.slot_ids):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            call = lambda: fn(b.input_ids, b.position_ids, b.slot_ids)  # noqa: E731
            first = [clock.time(call)[0] for _ in range(2)]  # compile + warm-up; CUDA-graph capture
            for _ in range(task.warmup):
                clock.time(call)
            times, out = [], None
            for _ in range(task.steps):
                dt, out = clock.time(call)
                times.append(dt)
            median = statistics.median(times)
            result.step_ms.append(median * 1e3)
            result.compile_s += max(sum(first) - 2 * median, 0.0)
            if mode in task.profile_modes and n == task.tokens[0] and task.device == "cuda":
                result.census = census(clock, call)
            if mapping.is_last_pp_rank:
                logits = out.detach().clone()
                if mode == "eager":
                    reference[n] = logits
                elif n in reference:
                    result.checks.append(compare(n, logits, reference[n], task.tol))
            del out
    if backend is not None:
        r = backend.report
        result.graphs, result.matches = r.graphs, dict(r.matches)
        result.errors = [e.error.strip().splitlines()[-1] for e in r.errors]
        per_graph = config.predicted_matches(mapping, cuda=task.device == "cuda")
        result.predicted = {k: v * r.graphs for k, v in per_graph.items()}
    fn = backend = None  # drop the compiled stage (its CUDA graphs and pools) before the next mode
    torch._dynamo.reset()
    gc.collect()
    if task.device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_layout(rank: int, world_size: int, task: Task) -> RankResult:
    """One rank of one layout: build the stage once, run every mode, return the numbers."""
    os.environ.update(SAFE_ENVIRONMENT)
    mapping = Mapping(world_size=world_size, rank=rank, tp_size=task.tp, pp_size=task.pp)
    init_process_groups(mapping)
    config = model_config(task)
    if task.device == "cuda":
        os.environ.setdefault("FXPASSES_DRAW_WEIGHTS_ON_DEVICE", "1")  # 8B's draws: seconds on the GPU
    t0 = time.perf_counter()
    with torch.device(task.device):
        model = build_model("llama", config, mapping)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_heads = max(1, config.num_kv_heads // mapping.tp_size)
    kv_bytes = 2 * len(mapping.pp_layers(config.num_layers)) * kv_heads * config.head_dim * 2 * task.context
    copy = 0.0
    if task.device == "cuda":
        copy = decode_helpers().copy_bandwidth()
    layers = mapping.pp_layers(config.num_layers)
    progress(f"stage built in {time.perf_counter() - t0:.1f} s: layers {layers.start}..{layers.stop - 1}, "
             f"{weight_bytes / 1e9:.2f} GB of weights, copy bandwidth {copy:.0f} GB/s")
    clock = Clock(task.device)
    reference: dict[int, torch.Tensor] = {}
    results = []
    for mode in task.modes:
        try:
            res = run_mode(task, mode, model, mapping, config, clock, reference)
        except Exception as err:  # noqa: BLE001 - a mode that fails is reported, the other modes still run
            res = ModeResult(mode, failure=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")
            torch._dynamo.reset()
            clock.barrier()  # both ranks fail alike at compile time; a rank failing alone hangs its peer (timeout)
        results.append(res)
        progress(f"{mode}: " + (res.failure or ", ".join(f"{n} tok {ms:.3f} ms" for n, ms in zip(task.tokens, res.step_ms))
                                + f"; compile {res.compile_s:.1f} s"))
    model = None  # free this layout's stage before the next layout builds its own on these ranks
    reference.clear()
    gc.collect()
    if task.device == "cuda":
        torch.cuda.empty_cache()
    return RankResult(rank, mapping.tp_rank, mapping.pp_rank, mapping.is_last_pp_rank, weight_bytes, kv_bytes, copy,
                      results)


# ---- in the parent ---------------------------------------------------------------------------------------------
def roofline_ms(ranks: list[RankResult], tokens: int) -> float:
    """Every stage reads its weights and its KV once, one stage after another; TP ranks of a stage in parallel."""
    if not ranks[0].copy_gbps:
        return 0.0
    stages: dict[int, float] = {}
    for r in ranks:
        ms = (r.weight_bytes + r.kv_bytes * tokens) / r.copy_gbps / 1e6
        stages[r.pp_rank] = max(stages.get(r.pp_rank, 0.0), ms)
    return sum(stages.values())


def print_layout(name: str, task: Task, ranks: list[RankResult], header: str) -> bool:
    """The layout's markdown table and notes; returns False when a logits check failed or a mode failed."""
    ok = True
    print(f"\n### {header}\n", flush=True)
    roof = roofline_ms(ranks, task.tokens[0])
    cols = " | ".join(f"{n} tok (ms)" for n in task.tokens)
    print(f"| mode | compile (s) | {cols} | {task.tokens[0]} tok / roofline | logits vs eager (max abs diff) |")
    print("|---|---|" + "---|" * len(task.tokens) + "---|---|")
    notes = []
    for i, mode in enumerate(task.modes):
        per_rank = [r.modes[i] for r in ranks]
        failed = [f"rank {r.rank}: {m.failure}" for r, m in zip(ranks, per_rank) if m.failure]
        if failed:
            ok = False
            print(f"| {mode} | failed | " + " | ".join("-" for _ in task.tokens) + " | - | - |")
            notes.append(f"MODE FAILED: {mode}: " + "; ".join(failed))
            continue
        times = [max(m.step_ms[k] for m in per_rank) for k in range(len(task.tokens))]
        compile_s = max(m.compile_s for m in per_rank)
        checks = [c for m in per_rank for c in m.checks]
        if mode == "eager":
            numerics = "reference"
        elif not checks:
            numerics = "no eager reference"
        else:
            worst = max(checks, key=lambda c: c.max_abs_diff / max(c.ref_max_abs, 1e-30))
            numerics = f"{max(c.max_abs_diff for c in checks):.3g} (of max {worst.ref_max_abs:.3g})"
            for r, m in zip(ranks, per_rank):
                for c in m.checks:
                    if not c.ok:
                        ok = False
                        notes.append(f"LOGITS MISMATCH: {name} {mode} rank {r.rank} at {c.tokens} tok: max abs diff "
                                     f"{c.max_abs_diff:.4g} > tol {task.tol} x max |eager| {c.ref_max_abs:.4g} "
                                     f"(relative L2 {c.rel_l2:.3g})")
            notes.append(f"{mode}: logits relative L2 error vs eager: " + ", ".join(
                f"rank {c_rank} {c.tokens} tok {c.rel_l2:.2g}" for c_rank, c in
                ((r.rank, c) for r, m in zip(ranks, per_rank) for c in m.checks)))
        roof_col = f"{times[0] / roof:.2f}x" if roof else "-"
        print(f"| {mode} | {compile_s:.1f} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {roof_col} | {numerics} |")
        if len(ranks) > 1:
            notes.append(f"{mode}: per rank (stage) at {task.tokens[0]} tok: " + ", ".join(
                f"rank {r.rank} (pp {r.pp_rank}) {m.step_ms[0]:.3f} ms" for r, m in zip(ranks, per_rank)))
        for r, m in zip(ranks, per_rank):
            if m.errors:
                ok = False
                notes.append(f"PASS ERRORS: {mode} rank {r.rank}: {m.errors}")
            if m.graphs and m.matches != m.predicted:
                notes.append(f"MATCHES DIFFER: {mode} rank {r.rank}: {m.matches}, predicted {m.predicted} "
                             f"({m.graphs} graphs)")
        if per_rank[0].graphs and all(m.matches == m.predicted for m in per_rank):
            notes.append(f"{mode}: {per_rank[0].graphs} graph(s) per rank, every rank's matches as predicted; rank 0: "
                         + ", ".join(f"{k}={v}" for k, v in sorted(per_rank[0].matches.items())))
    for i, mode in enumerate(task.modes):
        for r in ranks:
            found = r.modes[i].census
            if found:
                step = [v for k, v in found.items() if k != BARRIER_CLASS]
                total_n, total_ms = sum(n for n, _ in step), sum(ms for _, ms in step)
                print(f"\nkernel census, {mode}, rank {r.rank} (pp {r.pp_rank}), {task.tokens[0]} token(s): "
                      f"{total_n:.0f} kernels, {total_ms:.3f} ms of GPU time per step: " + "; ".join(
                          f"{k} {n:.0f}: {ms:.3f} ms" for k, (n, ms) in found.items()))
    if roof:
        print(f"\nroofline at {task.tokens[0]} token(s): {roof:.3f} ms (each stage's weights and KV over its copy bandwidth, "
              f"{ranks[0].copy_gbps:.0f} GB/s on rank 0; stages one after another)")
    print("\n" + "\n".join(f"- {n}" for n in notes), flush=True)
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="8b")
    parser.add_argument("--tiny", action="store_true", help="the tiny test config (CPU smoke path)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the model's (said in the header)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=None, help=f"default: all of {MODES} (on CPU: eager fxpasses)")
    parser.add_argument("--layouts", nargs="+", default=None, choices=sorted(LAYOUTS),
                        help="default: tp2 pp2, and tp2pp2 when 4 GPUs are visible")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per size after the compile and capture")
    parser.add_argument("--mark", choices=["dynamic", "unbacked"], default="dynamic",
                        help="token dimension: maybe_mark_dynamic (1 token compiles a second, static graph) or "
                             "mark_unbacked (one graph for every count), as in decode.py")
    parser.add_argument("--tol", type=float, default=5e-2,
                        help="logits mismatch when max |compiled - eager| > tol x max |eager|")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per layout before every rank is killed")
    parser.add_argument("--profile", nargs="*", default=None, metavar="MODE",
                        help="kernel census (NCCL in a class of its own) of these modes at the first token count, "
                             "on CUDA; no MODE: fxpasses+full-cudagraphs and reduce-overhead")
    parser.add_argument("--warm-caches", action="store_true",
                        help="keep the user's Triton and Inductor caches (default: fresh ones, cold compile times)")
    args = parser.parse_args(argv)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cpu" and args.backend == "nccl":
        parser.error("--backend nccl needs --device cuda; use --backend gloo on CPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --tiny --device cpu --backend gloo")
    if args.modes is None:
        args.modes = MODES if args.device == "cuda" else ["eager", "fxpasses"]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; choose from {MODES}")
    if args.device == "cpu" and CUDA_ONLY_MODES & set(args.modes):
        parser.error(f"--modes: {sorted(CUDA_ONLY_MODES & set(args.modes))} need CUDA (CUDA graphs); leave them out "
                     "with --device cpu")
    if args.profile is not None and args.device != "cuda":
        parser.error("--profile: the kernel census needs --device cuda")
    args.profile = ["fxpasses+full-cudagraphs", "reduce-overhead"] if args.profile == [] else (args.profile or [])
    if any(n < 1 for n in args.tokens) or args.steps < 1 or args.context < 1:
        parser.error("--tokens, --steps and --context must be at least 1")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.layouts is None:
        args.layouts = ["tp2", "pp2"] + (["tp2pp2"] if gpus >= 4 else [])
    if args.backend == "nccl":
        need = [name for name in args.layouts if LAYOUTS[name][0] * LAYOUTS[name][1] > gpus]
        if need:
            parser.error(f"--layouts {need} need more GPUs than the {gpus} visible (one process per GPU over NCCL)")
    return args


def run_one_layout(pool: RankPool, name: str, model: str, layers: int, full_layers: int, device_name: str,
                   args: argparse.Namespace) -> bool:
    tp, pp = LAYOUTS[name]
    task = Task(model, args.layers, tp, pp, tuple(args.tokens), args.context, tuple(args.modes), args.device,
                args.steps, args.warmup, args.mark, args.tol, tuple(args.profile))
    header = (f"Llama-{model} shape, {name.upper()} ({tp * pp} ranks over {args.backend}), {layers} of "
              f"{full_layers} layers{' (FEWER LAYERS)' if layers != full_layers else ''}, {device_name}")
    t0 = time.perf_counter()
    ranks = pool.run(run_layout, task, on_progress=lambda r, msg: print(f"  [{name} rank {r}] {msg}", file=sys.stderr,
                                                                        flush=True))
    return print_layout(name, task, ranks, header + f" (layout ran {time.perf_counter() - t0:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends SIGTERM: unwind, killing the ranks
    os.environ.update(SAFE_ENVIRONMENT)  # inherited by every rank
    # NCCL's heartbeat monitor polls rank 0's TCP store; when the pool closes, rank 0 (the store) exits first and the
    # others' monitors print a traceback a second until they exit. RankPool's own timeout covers hung ranks.
    os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
    with contextlib.ExitStack() as stack:
        if not args.warm_caches:  # cold compiles: fresh Triton and Inductor caches, inherited by every rank
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="decode_multigpu_"))
            os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    model = "tiny" if args.tiny else args.model
    full_layers = LlamaConfig().num_layers if args.tiny else MODEL_SHAPES[args.model]().num_layers
    layers = args.layers or full_layers
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"decode over {args.backend}: {device_name}, torch {torch.__version__}, model {model} "
          f"({layers} of {full_layers} layers), bf16, context {args.context}, token dimension marked {args.mark}, "
          f"{args.steps} timed steps per size (median; a barrier before each), Triton and Inductor caches "
          f"{'as found' if args.warm_caches else 'fresh (cold compiles)'}, NVLink multicast off", flush=True)
    all_ok = True
    by_world: dict[int, list[str]] = {}
    for name in args.layouts:  # layouts of one world size share their ranks (one process start, one NCCL init)
        by_world.setdefault(LAYOUTS[name][0] * LAYOUTS[name][1], []).append(name)
    for world, names in by_world.items():
        try:
            with RankPool(world, backend=args.backend, timeout=args.timeout) as pool:
                try:
                    for name in names:
                        all_ok &= run_one_layout(pool, name, model, layers, full_layers, device_name, args)
                except BaseException:  # a failed rank, the timeout, Ctrl-C or SIGTERM: no rank outlives us on a GPU
                    pool.kill()
                    raise
        except Exception as err:  # noqa: BLE001 - report and go on to the next world size
            print(f"\nLAYOUTS {names} FAILED: {type(err).__name__}: {err}", flush=True)
            all_ok = False
    if not all_ok:
        print("\nSOME CHECKS FAILED (see the loud lines above)", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
