"""GPU: decode step latency of Llama-shaped models (random bf16 weights, one rank), by number of sequences.

    python benchmarks/decode.py [--model 1b|8b] [--tokens 1 8 32 128 512 2048] [--modes ...] [--out DIR] [--profile]

Each step decodes one token for each of ``tokens`` sequences that already hold ``--context`` cached tokens.
Modes: eager; torch.compile (Inductor, default); torch.compile(mode="reduce-overhead"); fxpasses without Inductor
plus piecewise CUDA graphs (attention eager between captured pieces); fxpasses without Inductor plus full CUDA
graphs (``splitting_ops=()``, attention captured too); fxpasses with Inductor, without and with Inductor's own
CUDA graphs (``inductor_config={"triton.cudagraphs": True}``, what reduce-overhead turns on). Compile time is the sum over sizes of
each size's first call minus a warm call (Dynamo, AOT, passes, code generation, warm-up and capture: everything a
server pays before its first fast step). Roofline: weight bytes plus the KV bytes a step reads, over the copy
bandwidth measured in the same run. Every mode runs the same model code and the same ``fxp.attention`` op (its
Triton kernel on CUDA). ``fxpasses+full-cudagraphs-cublas`` is full graphs without the ``linear`` patterns (every
projection on cuBLAS, norms unfused), to measure what the small-token GEMM path (``fxp.linear``) changes in the
same run; ``fxpasses+full-cudagraphs-nofuse`` keeps ``fxp.linear`` but none of the decode fusions of issue 14
(``FUSIONS``: RMSNorm in the projection's prologue, SiLU-and-mul in the gate/up epilogue, RoPE in attention), to
measure what they change. Any fxpasses mode with the suffix ``-nopdl`` runs with ``FXPASSES_PDL=0`` (the linear
kernels launched without programmatic dependent launch, as before issue 14's PDL work), ``-waitfirst`` with
``FXPASSES_PDL=wait`` (PDL, no weight block read before the wait) and ``-prefetch`` with ``FXPASSES_PDL=1`` (PDL,
the first weight block read before the wait where ``fxpasses.stable_weights`` marked the projection), for A/B runs
of PDL in the same process; without a suffix a mode runs ``FXPASSES_PDL`` as set (unset: ``PDL_DEFAULT`` in
ops/triton_linear.py). Each fxpasses mode prints its pattern matches. Prints a markdown table;
saves decode_<model>.png in ``--out`` when matplotlib is there.

``--profile`` adds the kernel census of each mode (issue 14): the step replayed 5 times under the torch profiler
(CUDA activity, which records the kernels inside CUDA-graph replays), each kernel put in a class by its name, and
per class the kernels per step and the GPU time per step. ``--linear-table FILE`` loads a table of Triton tiles
measured by ``benchmarks/gemm.py --sweep --out DIR`` (its gemm.json) in place of the one in ops/triton_linear.py.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from typing import Any

import torch
import triton.testing

import fxpasses
from fxpasses import patterns
from fxpasses.models import Batch, LlamaConfig, build_model

MODES = ["eager", "inductor", "reduce-overhead", "fxpasses+cudagraphs", "fxpasses+full-cudagraphs",
         "fxpasses+full-cudagraphs-nopdl", "fxpasses+full-cudagraphs-waitfirst", "fxpasses+full-cudagraphs-prefetch",
         "fxpasses+full-cudagraphs-cublas",
         "fxpasses+full-cudagraphs-nofuse", "fxpasses+inductor", "fxpasses+inductor+cudagraphs"]
# mode suffix -> FXPASSES_PDL for that mode (compile, capture and replays)
PDL_SUFFIXES = {"-nopdl": "0", "-waitfirst": "wait", "-prefetch": "1"}


def pdl_setting(mode: str) -> tuple[str, str | None]:
    """(the mode without its PDL suffix, the FXPASSES_PDL value it asks for or None)."""
    for suffix, value in PDL_SUFFIXES.items():
        if mode.startswith("fxpasses") and mode.endswith(suffix):
            return mode[: -len(suffix)], value
    return mode, None
# the decode fusions of issue 14: what ``fxpasses+full-cudagraphs-nofuse`` leaves out
FUSIONS = (*patterns.linear.FUSED_PATTERNS, "rope_attention")
SHAPES = {"1b": LlamaConfig.llama_3_2_1b, "8b": LlamaConfig.llama_3_8b}


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=100) / 1e6


def decode_batch(n: int, context: int, vocab: int) -> Batch:
    g = torch.Generator().manual_seed(n)
    return Batch(torch.randint(0, vocab, (n,), generator=g).cuda(), torch.full((n,), context).cuda(),
                 torch.arange(n).cuda())


# kernel classes of the census, first match wins (lower-case substrings of the kernel name)
KERNEL_CLASSES = [
    ("fused GEMV: norm / SiLU-and-mul folded in (Triton)", ("_fused_gemv_kernel",)),  # before the GEMV class
    ("GEMM (Triton fxp.linear)", ("_gemv_kernel", "_gemv_rows_kernel", "_small_m_kernel")),
    ("GEMM (cuBLAS)", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "cublas")),
    ("attention", ("_attention_kernel",)),
    ("cache write", ("_cache_write_kernel",)),
    ("RoPE", ("_rotary_kernel",)),
    ("SiLU-and-mul", ("_silu_and_mul_kernel",)),
    ("norm", ("_norm_kernel", "rsqrt", "rms")),
    ("Inductor fused (other)", ("triton_",)),
    ("copy / memset", ("memcpy", "memset", "copy")),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def census(call: Any, steps: int = 5) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per kernel class: [kernels per step, GPU µs per step] over ``steps`` profiled steps; and the other kernels'
    names with their µs per step (so a class list that misses something shows it)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
    classes: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    others: dict[str, float] = collections.defaultdict(float)
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(evt, "self_device_time_total", None)
        us = evt.self_cuda_time_total if us is None else us
        cls = kernel_class(evt.key)
        classes[cls][0] += evt.count / steps
        classes[cls][1] += us / steps
        if cls == "other":
            others[evt.key[:80]] += us / steps
    return dict(classes), dict(others)


def print_census(mode: str, tokens: int, classes: dict[str, list[float]], others: dict[str, float]) -> None:
    total_n = sum(c[0] for c in classes.values())
    total_us = sum(c[1] for c in classes.values())
    print(f"\n**{mode}, {tokens} token(s): kernel census** ({total_n:.0f} kernels, {total_us / 1e3:.3f} ms of GPU "
          "time per step)\n")
    print("| kernels | per step | ms per step |\n|---|---|---|")
    for cls, (n, us) in sorted(classes.items(), key=lambda kv: -kv[1][1]):
        print(f"| {cls} | {n:.0f} | {us / 1e3:.3f} |")
    if others:
        print("\nother: " + ", ".join(f"{k} {v:.1f} µs" for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:8]))


def load_linear_table(paths: list[str]) -> None:
    """Replace ops/triton_linear.py's TABLE by the ones in ``paths`` (gemm.json files; later files win)."""
    from fxpasses.ops import triton_linear

    triton_linear.TABLE.clear()
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["table"]
        for bm, n, k, block_m, block_n, block_k, warps, stages, _ in rows:
            triton_linear.TABLE[(bm, n, k)] = triton_linear.Config(block_m, block_n, block_k, warps, stages)
        print(f"linear table from {path}: {len(rows)} entries")


def make_fn(mode: str, model: torch.nn.Module, sizes: list[int]) -> tuple[Any, fxpasses.Backend | None]:
    """The callable for a mode, and its fxpasses Backend (None for the modes without one)."""
    torch._dynamo.reset()
    backends = {
        "fxpasses+cudagraphs": lambda: fxpasses.Backend(cuda_graph_sizes=sizes),
        "fxpasses+full-cudagraphs": lambda: fxpasses.Backend(cuda_graph_sizes=sizes, splitting_ops=()),
        "fxpasses+full-cudagraphs-cublas": lambda: fxpasses.Backend(
            cuda_graph_sizes=sizes, splitting_ops=(), patterns=[p for p in patterns.all() if "linear" not in p.name]),
        "fxpasses+full-cudagraphs-nofuse": lambda: fxpasses.Backend(
            cuda_graph_sizes=sizes, splitting_ops=(),
            patterns=[p for p in patterns.all() if p.name not in FUSIONS]),
        "fxpasses+inductor": lambda: fxpasses.Backend(inductor=True),
        "fxpasses+inductor+cudagraphs": lambda: fxpasses.Backend(inductor=True,
                                                                 inductor_config={"triton.cudagraphs": True}),
    }
    if mode == "eager":
        return model, None
    if mode == "inductor":
        return torch.compile(model), None
    if mode == "reduce-overhead":
        return torch.compile(model, mode="reduce-overhead"), None
    if mode in backends:
        backend = backends[mode]()
        return torch.compile(model, backend=backend), backend
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--out", default=".")
    parser.add_argument("--mark", choices=["dynamic", "unbacked"], default="dynamic",
                        help="how the token dimension is marked for every mode: maybe_mark_dynamic (Dynamo "
                             "specializes 1 token: a second compile) or mark_unbacked (one graph for every count)")
    parser.add_argument("--profile", action="store_true", help="print each mode's kernel census (issue 14)")
    parser.add_argument("--profile-tokens", type=int, nargs="+", default=[1])
    parser.add_argument("--linear-table", nargs="+", default=None,
                        help="gemm.json files from benchmarks/gemm.py --sweep --out (later files win)")
    args = parser.parse_args()
    if args.linear_table:
        load_linear_table(args.linear_table)
    slots = max(args.tokens)
    config = SHAPES[args.model](dtype=torch.bfloat16, max_slots=slots, max_len=args.context + 8)
    os.environ.setdefault("FXPASSES_DRAW_WEIGHTS_ON_DEVICE", "1")  # 8B's draws: seconds on the GPU, minutes on the CPU
    with torch.device("cuda"):
        model = build_model("llama", config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    copy = copy_bandwidth()
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # k and v, bf16
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, model {args.model} "
          f"({weight_bytes / 1e9:.2f} GB of weights), copy bandwidth {copy:.0f} GB/s, context {args.context}, "
          f"token dimension marked {args.mark}\n")
    print("| mode | compile (s) | " + " | ".join(f"{n} tok (ms)" for n in args.tokens) + " | 1 tok / roofline |")
    print("|---|---|" + "---|" * len(args.tokens) + "---|")
    results, notes, censuses = {}, [], []
    for mode in args.modes:
        base, pdl = pdl_setting(mode)
        saved_pdl = os.environ.get("FXPASSES_PDL")
        if pdl is not None:  # otherwise as the caller set it (unset: PDL on)
            os.environ["FXPASSES_PDL"] = pdl
        fn, backend = make_fn(base, model, args.tokens)
        times, compile_s = [], 0.0
        with torch.inference_mode():
            for n in args.tokens:
                b = decode_batch(n, args.context, config.vocab_size)
                if args.mark == "unbacked":
                    fxpasses.mark_token_dim(b.input_ids, b.position_ids, b.slot_ids)
                else:
                    for t in (b.input_ids, b.position_ids, b.slot_ids):
                        torch._dynamo.maybe_mark_dynamic(t, 0)
                call = lambda: fn(b.input_ids, b.position_ids, b.slot_ids)  # noqa: E731
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                call()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ms = triton.testing.do_bench(call, warmup=5, rep=30)
                compile_s += max(first - ms / 1e3, 0.0)
                times.append(ms)
                if args.profile and n in args.profile_tokens:
                    censuses.append((mode, n, *census(call)))
        results[mode] = times
        if saved_pdl is None:
            os.environ.pop("FXPASSES_PDL", None)
        else:
            os.environ["FXPASSES_PDL"] = saved_pdl
        if backend is not None:
            r = backend.report
            notes.append(f"{mode}: {r.graphs} graphs; inside the backend {r.compile_seconds:.1f} s, of which the "
                         f"fxpasses pipeline {r.pipeline_seconds:.2f} s and pattern set-up "
                         f"{backend.pattern_setup_seconds:.2f} s; the rest of the compile is Dynamo (and Inductor); "
                         "matches: " + ", ".join(f"{k}={v}" for k, v in sorted(r.matches.items())))
        roof_ms = (weight_bytes + kv_per_token * args.context) / copy / 1e6
        print(f"| {mode} | {compile_s:.1f} | " + " | ".join(f"{t:.2f}" for t in times)
              + f" | {times[0] / roof_ms:.2f}x |", flush=True)
    print("\n" + "\n".join(f"- {n}" for n in notes))
    for c in censuses:
        print_census(*c)
    plot(results, args.tokens, (weight_bytes, kv_per_token * args.context, copy),
         os.path.join(args.out, f"decode_{args.model}.png"), args.model)


def plot(results: dict[str, list[float]], tokens: list[int], roof: tuple[int, int, float], path: str,
         model: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    weight_bytes, kv_per_seq, copy = roof
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, times in results.items():
        ax.plot(tokens, times, marker="o", label=mode)
    ax.plot(tokens, [(weight_bytes + kv_per_seq * n) / copy / 1e6 for n in tokens], "k--", lw=0.8, label="roofline")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequences (one decode token each)")
    ax.set_ylabel("step latency (ms)")
    ax.set_title(f"Llama {model} shape, bf16, one H200")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
