"""Cold and warm start of a compiled model in fresh processes: what a restarted server waits for.

    python benchmarks/warm_start.py --model tiny --device cpu          # CI machine
    python benchmarks/warm_start.py --model 1b --device cuda            # GPU (8b too)

For each mode, one empty cache directory (fxpasses' compile cache, Inductor's and Triton's caches all inside it),
then ``--runs`` fresh processes one after another: the first is the cold start, the others warm. Each process
builds the model (not timed), then times the start: the Backend, ``torch.compile`` and the first call at each
token count of ``--tokens`` (compile plus, on CUDA with CUDA graphs, capture), the token dimension marked with
``fxpasses.mark_token_dim`` (one graph for every count). Imports are reported apart (the same for every mode).
Every process checks its outputs against eager: bit-equal for fxpasses on CPU; elsewhere the largest difference
relative to the largest logit is at most 5% (bf16 logits after many layers; the table prints it).

Modes: ``fxpasses-precompiled`` (``fxpasses.precompile``: the cold process compiles and saves Dynamo's compile
with our graph, a warm one loads it without a Dynamo trace), ``fxpasses`` (``torch.compile`` with the compile
cache: Dynamo traces in every process; on CUDA both use full CUDA graphs, ``splitting_ops=()``),
``fxpasses-nocache`` (``cache=False``: the cost the cache removes), and the stock comparison ``inductor`` (CPU) or
``reduce-overhead`` (CUDA). The last line is ``warm/cold = X`` for ``fxpasses-precompiled`` when it ran, else for
``fxpasses`` (median warm over cold, wall clock); on CUDA, lines before it compare each fxpasses mode's warm and
cold start with reduce-overhead's. CPU time of each start is printed too: on a shared machine it varies less than
wall time. The last column counts the graphs Dynamo traced in each process (0 for a loaded precompile).

A second table says where each start went: the Backend's compile calls (AOT, pattern tracing, the pipeline),
pattern tracing and the pipeline alone, and the Triton kernels compiled in the process (count and seconds, from
Triton's compilation listener; with compile-ahead they overlap the rest, so their sum can exceed the start).
On CUDA the model's weights are drawn on the GPU (``FXPASSES_DRAW_WEIGHTS_ON_DEVICE``): seconds for 8B, not minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import fxpasses
from fxpasses.models import Batch, LlamaConfig, build_model
imports = time.perf_counter() - t0
mode, model_name, device, tokens = sys.argv[1], sys.argv[2], sys.argv[3], [int(t) for t in sys.argv[4].split(",")]
dtype = torch.float32 if device == "cpu" else torch.bfloat16
slots = max(tokens)
config = (LlamaConfig(max_slots=slots) if model_name == "tiny" else
          {"1b": LlamaConfig.llama_3_2_1b, "8b": LlamaConfig.llama_3_8b}[model_name](max_slots=slots, max_len=64))
import dataclasses; config = dataclasses.replace(config, dtype=dtype)
with torch.device(device):
    model = build_model("llama", config)
import copy; reference = copy.deepcopy(model)  # same weights and fresh caches; drawing 8B weights twice took minutes
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

def batch(n):
    g = torch.Generator().manual_seed(n)
    return Batch(torch.randint(0, config.vocab_size, (n,), generator=g).to(device),
                 torch.full((n,), 3).to(device), torch.arange(n).to(device))

import os, cProfile, pstats, io
triton_compiles = None if device != "cuda" else [0, 0.0]  # count, seconds: every Triton kernel this process compiled in-process (cache misses)
if device == "cuda":
    try:
        import triton
        def _listen(*, src, times, cache_hit, **_):
            if not cache_hit:
                triton_compiles[0] += 1
                triton_compiles[1] += times.total / 1e6
                if profiler:
                    print(f"triton compile {getattr(src, 'name', src)}: {times.total / 1e6:.3f} s "
                          f"{dict(times.lowering_stages)}", file=sys.stderr)
        triton.knobs.compilation.listener = _listen
    except (ImportError, AttributeError):  # an older Triton: the column stays empty
        triton_compiles = None
profile_path = os.environ.get("WARM_START_PROFILE")
profiler = cProfile.Profile() if profile_path else None
if profiler:
    profiler.enable()
t0, c0 = time.perf_counter(), time.process_time()
backend = status = None
if mode.startswith("fxpasses"):
    kwargs = dict(cuda_graph_sizes=tokens, splitting_ops=()) if device == "cuda" else {}
    backend = fxpasses.Backend(cache=mode != "fxpasses-nocache", **kwargs)
    fn = torch.compile(model, backend=backend) if mode != "fxpasses-precompiled" else None
elif mode == "inductor":
    fn = torch.compile(model)
else:
    fn = torch.compile(model, mode="reduce-overhead")
equal, worst = True, 0.0
with torch.inference_mode():
    if mode == "fxpasses-precompiled":  # a saved Dynamo compile in FXPASSES_CACHE_DIR: loaded, or compiled and saved
        b = batch(tokens[0])
        fn = fxpasses.precompile(model, (b.input_ids, b.position_ids, b.slot_ids), backend=backend)
        status = fn.status
    for n in tokens:
        b = batch(n)
        fxpasses.mark_token_dim(b.input_ids, b.position_ids, b.slot_ids)
        out = fn(b.input_ids, b.position_ids, b.slot_ids)
        sync()
    start, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile_path + ".pstats")  # for sorting by own time, callers, ... afterwards
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(70)
        from fxpasses.compat import dynamo_compile_times
        with open(profile_path, "w") as f:
            f.write(f"start {start:.2f} s\n" + dynamo_compile_times() + "\n" + text.getvalue())
    for n in tokens:  # numbers: a second call of each size against eager, on fresh caches of both models
        b = batch(n)
        fxpasses.mark_token_dim(b.input_ids, b.position_ids, b.slot_ids)
        out = fn(b.input_ids, b.position_ids, b.slot_ids).clone()
        ref = reference(b.input_ids, b.position_ids, b.slot_ids)
        # CPU: fxpasses is bit-equal to eager. GPU (bf16, fused kernels, many layers): the largest difference
        # relative to the largest logit, at most 5% (an elementwise rtol/atol fails even for reduce-overhead)
        diff = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
        worst = max(worst, diff)
        same = torch.equal(out, ref) if mode.startswith("fxpasses") and device == "cpu" else diff <= 0.05
        equal = equal and bool(same)
from fxpasses.compat import dynamo_frames_traced
events = ([str(status)] if status is not None else []) + (
    [str(e) for e in backend.cache_events] + [n for n in backend.report.notes if "kernel(s) ahead" in n]
    if backend is not None else [])
hits = (int(status.loaded) if status is not None else
        sum(e.hit for e in backend.cache_events) if backend is not None else 0)
phases = {"backend": backend.report.compile_seconds if backend is not None else None,
          "patterns": backend.pattern_setup_seconds if backend is not None else None,
          "pipeline": backend.report.pipeline_seconds if backend is not None else None,
          "triton": triton_compiles}
print(json.dumps({"imports": imports, "start": start, "phases": phases, "cpu": cpu, "equal": equal, "diff": worst, "events": events,
                  "hits": hits, "traced": dynamo_frames_traced(),
                  "graphs": backend.report.graphs if backend is not None else None,
                  "torch": torch.__version__}))
"""


def run_child(mode: str, args: argparse.Namespace, cache: Path, index: int) -> dict:
    profile = ({"WARM_START_PROFILE": str(Path(args.profile_dir).resolve() / f"{mode}-{index}.txt")}
               if args.profile_dir else {})
    env = dict(os.environ, **profile, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FXPASSES_CACHE_DIR=str(cache / "fxpasses"), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
               TRITON_CACHE_DIR=str(cache / "triton"), FXPASSES_VERIFY="0",
               # an 8B model's weights drawn on the GPU: seconds, not minutes of CPU draws per process
               FXPASSES_DRAW_WEIGHTS_ON_DEVICE="1" if args.device == "cuda" else "0")
    env.pop("FXPASSES_CACHE", None)
    out = subprocess.run([sys.executable, "-c", CHILD, mode, args.model, args.device,
                          ",".join(map(str, args.tokens))], capture_output=True, text=True, env=env, cwd=ROOT)
    if args.profile_dir:  # warnings and anything a sitecustomize hook printed (e.g. who imported what)
        (Path(args.profile_dir) / f"{mode}-{index}.stderr").write_text(out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} process failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "1b", "8b"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=3, help="processes per mode: one cold, the rest warm")
    parser.add_argument("--modes", nargs="+", default=None,
                        help="default: fxpasses fxpasses-nocache and inductor (cpu) or reduce-overhead (cuda)")
    parser.add_argument("--profile-dir", default=None,
                        help="write a cProfile of each process's start (and Dynamo's phase times) into this folder")
    args = parser.parse_args()
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    stock = "inductor" if args.device == "cpu" else "reduce-overhead"
    modes = args.modes or ["fxpasses-precompiled", "fxpasses", "fxpasses-nocache", stock]
    unknown = sorted(set(modes) - {"fxpasses-precompiled", "fxpasses", "fxpasses-nocache", "inductor",
                                   "reduce-overhead"})
    if unknown:
        parser.error(f"unknown --modes {unknown}; choose from fxpasses-precompiled fxpasses fxpasses-nocache "
                     "inductor reduce-overhead")
    results: dict[str, list[dict]] = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="warm_start_") as cache:
            results[mode] = []
            for i in range(args.runs):  # one line per process as it ends: a run cut short still tells something
                results[mode].append(run_child(mode, args, Path(cache), i))
                print(f"{mode} process {i + 1} ({'cold' if i == 0 else 'warm'}): start "
                      f"{results[mode][-1]['start']:.2f} s", flush=True)
    first = next(iter(results.values()))[0]
    print(f"model {args.model}, device {args.device}, torch {first['torch']}, tokens {args.tokens}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; start = Backend + torch.compile + first call at "
          f"each token count (imports {first['imports']:.1f} s and model build not included)\n")
    print("| mode | cold (s) | warm (s), each process | warm / cold | CPU time cold / warm (s) | equal to eager "
          "(max diff / max logit) | cache hits (loads) | Dynamo traces |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, runs in results.items():
        cold, warm = runs[0]["start"], [r["start"] for r in runs[1:]]
        ratio = statistics.median(warm) / cold if warm else float("nan")
        cpu = f"{runs[0]['cpu']:.2f} / " + ", ".join(f"{r['cpu']:.2f}" for r in runs[1:])
        cache = str([r["hits"] for r in runs]) if mode in ("fxpasses", "fxpasses-precompiled") else "-"
        print(f"| {mode} | {cold:.2f} | {', '.join(f'{w:.2f}' for w in warm)} | {ratio:.2f} | {cpu} | "
              f"{all(r['equal'] for r in runs)} ({max(r['diff'] for r in runs):.1e}) | {cache} | "
              f"{[r['traced'] for r in runs]} |")
    print("\nWhere each start went (s): `backend` is the Backend's compile calls (AOT autograd, pattern tracing "
          "and the pipeline, or a cache hit; Dynamo and the first calls are the rest of `start`); `triton` counts "
          "the Triton kernels compiled in the process (Inductor compiles its own in worker processes: not counted)."
          "\n\n| mode | process | start | backend | pattern tracing | pipeline | triton compiles (n, s) |")
    print("|---|---|---|---|---|---|---|")
    for mode, runs in results.items():
        for i, r in enumerate(runs):
            ph = r["phases"]
            cell = lambda v: "-" if v is None else f"{v:.2f}"
            tri = "-" if ph["triton"] is None else f"{ph['triton'][0]}, {ph['triton'][1]:.2f}"
            print(f"| {mode} | {i + 1} ({'cold' if i == 0 else 'warm'}) | {r['start']:.2f} | {cell(ph['backend'])} | "
                  f"{cell(ph['patterns'])} | {cell(ph['pipeline'])} | {tri} |")
    for mode, runs in results.items():
        for i, r in enumerate(runs):
            for e in r["events"]:
                print(f"- {mode} process {i + 1}: {e}")
    def warm(mode: str) -> float:
        return statistics.median(r["start"] for r in results[mode][1:])

    ours = [m for m in ("fxpasses", "fxpasses-precompiled") if m in results and len(results[m]) > 1]
    if stock in results and len(results[stock]) > 1:
        for mode in ours:
            print(f"\n{mode} warm / {stock} warm = {warm(mode) / warm(stock):.2f}, "
                  f"{mode} cold / {stock} cold = {results[mode][0]['start'] / results[stock][0]['start']:.2f}")
    for i, mode in enumerate(ours):  # the last line is the best route: precompiled when it ran
        label = "warm/cold" if i == len(ours) - 1 else f"warm/cold ({mode})"
        print(f"\n{label} = {warm(mode) / results[mode][0]['start']:.2f}")


if __name__ == "__main__":
    main()
