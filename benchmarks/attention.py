"""GPU: decode attention over long contexts, split over the context (flash-decoding) against one program per
(token, kv head), and the bandwidth floor.

    python benchmarks/attention.py [--models 1b 8b] [--tokens 1 8 32] [--contexts 32 256 1024 4096 16384]
                                   [--waves 2 4 8]

Each row is a decode step's attention at the model's shape: ``layers`` calls of ``fxp.attention.rope`` (RoPE of q
and k, the cache write and attention in one launch, as the compiled models run it), each layer with its own cache
(a step reads every layer's cache once, from HBM), all captured in one CUDA graph and replayed; the median replay
per step. Every token is its own sequence with ``context`` cached positions. Columns: the unsplit kernel
(``FXPASSES_ATTENTION_SPLIT=0``'s path), the split kernel as the op plans it (``--waves``: as it would plan it
with that many programs per SM as the target, one column each; the op's own is ``SPLIT_WAVES``), and the floor: the bytes of cache a
step must read (k and v of every layer, position and token) at the copy bandwidth measured in the same run. Each
split result is checked against the unsplit one (the same math merged in another order: bf16 tolerance), and the
arrival counters must be back at zero.
"""
from __future__ import annotations

import argparse

import torch
import triton.testing

from fxpasses import ops  # noqa: F401  (registers the ops and their Triton kernels)
from fxpasses.ops import triton_attention as ta
from fxpasses.ops.arrival_counters import counters_idle

SHAPES = {"1b": dict(layers=16, heads=32, kv_heads=8, dim=64), "8b": dict(layers=32, heads=32, kv_heads=8, dim=128)}


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=100) / 1e6


def step_time_us(layers: list[tuple], split: ta.SplitPlan | None, replays: int = 50) -> tuple[float, torch.Tensor]:
    """Median replay of one CUDA graph holding every layer's call; and the last layer's output."""
    def step():
        out = None
        for q, k, v, kc, vc, slot, pos, cos, sin in layers:
            out = ta._launch(q, k, v, kc, vc, slot, pos, q.shape[-1] ** -0.5, (cos, sin, True),
                             q.shape[0] <= ta.MAX_FUSED_TOKENS, split=split)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # outside the capture first: the arrival counters exist before a captured launch needs them
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2], out.clone()


def make_layers(shape: dict, tokens: int, context: int, capacity: int) -> list[tuple]:
    g = torch.Generator(device="cuda").manual_seed(tokens * 100003 + context)
    heads, kv_heads, dim = shape["heads"], shape["kv_heads"], shape["dim"]
    slot = torch.arange(tokens, device="cuda")
    pos = torch.full((tokens,), context, device="cuda")
    ang = torch.rand(tokens, dim, device="cuda", generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    layers = []
    for _ in range(shape["layers"]):
        def rand(*s):
            return torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
        kc, vc = rand(tokens, capacity, kv_heads, dim), rand(tokens, capacity, kv_heads, dim)
        layers.append((rand(tokens, heads, dim), rand(tokens, kv_heads, dim), rand(tokens, kv_heads, dim), kc, vc,
                       slot, pos, cos, sin))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--contexts", nargs="+", type=int, default=[32, 256, 1024, 4096, 16384])
    parser.add_argument("--waves", nargs="+", type=int, default=None, help="split targets, programs per SM")
    parser.add_argument("--capacity", type=int, default=None,
                        help="cache positions per sequence (default: the context + 8): a server's cache is longer "
                             "than most contexts, and the split plan follows the capacity")
    parser.add_argument("--max-gb", type=float, default=24.0, help="skip rows whose caches exceed this")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bandwidth:.0f} GB/s, {sms} SMs")
    waves = args.waves or [ta.SPLIT_WAVES]
    print("| model | tokens | context | unsplit (us) | " + " | ".join(f"split, {w} per SM: plan, us" for w in waves)
          + " | floor (us) | best / floor |")
    print("|---|---|---|---|" + "---|" * len(waves) + "---|---|")
    for model in args.models:
        shape = SHAPES[model]
        block_n = 32 if shape["dim"] <= 128 else 16
        for tokens in args.tokens:
            for context in args.contexts:
                capacity = max(args.capacity or 0, context + 8)
                cache_bytes = shape["layers"] * tokens * capacity * shape["kv_heads"] * shape["dim"] * 2 * 2
                if cache_bytes > args.max_gb * 1e9:
                    print(f"| {model} | {tokens} | {context} | skipped: {cache_bytes / 1e9:.0f} GB of cache > --max-gb |")
                    continue
                layers = make_layers(shape, tokens, context, capacity)
                whole, out_whole = step_time_us(layers, ta.SplitPlan(1, capacity))
                cells, best = [], whole
                for w in waves:
                    ta.SPLIT_WAVES = w
                    plan = ta.plan_splits(tokens * shape["kv_heads"], capacity, block_n, sms)
                    split, out_split = step_time_us(layers, plan)
                    torch.cuda.synchronize()
                    if not counters_idle():
                        raise SystemExit("the arrival counters were left non-zero")
                    diff = (out_split.float() - out_whole.float()).abs().max().item()
                    if diff > 5e-2:
                        print(f"MISMATCH: split differs from unsplit by {diff:.3g} ({model}, {tokens}, {context})")
                    cells.append(f"{plan.splits} x {plan.chunk}: {split:.1f} ({whole / split:.2f}x)")
                    best = min(best, split)
                read_bytes = shape["layers"] * tokens * (context + 1) * shape["kv_heads"] * shape["dim"] * 2 * 2
                floor = read_bytes / bandwidth / 1e3
                print(f"| {model} | {tokens} | {context} | {whole:.1f} | " + " | ".join(cells)
                      + f" | {floor:.1f} | {best / floor:.1f}x |")
                del layers


if __name__ == "__main__":
    main()
