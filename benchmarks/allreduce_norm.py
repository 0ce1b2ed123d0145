"""NCCL all_reduce + ``fxp.add_rms_norm`` against the fused symmetric-memory kernels (ops/triton_allreduce.py).

Every variant runs inside a CUDA graph of ``--calls`` back-to-back calls (decode runs in graphs, and a graph strips
the launch overhead that would otherwise hide the kernels); the time per call is the median over ``--replays``
replays. Columns: NCCL + add_rms_norm, one-shot, two-shot (both forced, on a workspace large enough for every size),
the path the selection takes and its speed-up over the unfused pair.

Run one process per GPU (2, 4 or 8), from the repository root:

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/allreduce_norm.py

NVLink multicast stays off (set below before anything initializes NCCL or symmetric memory).
"""
from __future__ import annotations

import os

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

import argparse  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fxpasses import ops  # noqa: E402, F401  (registers the fxp ops and their CUDA kernels)
from fxpasses.ops import triton_allreduce as ta  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
HIDDENS = (4096, 8192)


@dataclass
class Row:
    tokens: int
    hidden: int
    nccl_us: float
    one_shot_us: float
    two_shot_us: float
    chosen: str
    chosen_us: float


def time_in_graph(fn: Callable[[], object], calls: int, replays: int) -> float:
    """Median microseconds per call of ``fn`` captured ``calls`` times in one CUDA graph."""
    fn()  # warm-up: Triton compiles, NCCL's first use, the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    del graph
    return statistics.median(times)


def measure(tokens: int, hidden: int, group: str, ws: ta.Workspace, calls: int, replays: int) -> Row:
    rank = dist.get_rank()
    g = torch.Generator(device="cuda").manual_seed(tokens * 131 + hidden)
    residual = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    weight = torch.randn(hidden, device="cuda", generator=g).to(torch.bfloat16)
    g.manual_seed(tokens * 131 + hidden + 97 * (rank + 1))
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    launch = ta.launch_for(ws)
    nccl = time_in_graph(lambda: ta.allreduce_add_rms_norm_nccl(x, residual, weight, 1e-5, group), calls, replays)
    one = time_in_graph(lambda: ta.fused_allreduce_add_rms_norm(x, residual, weight, 1e-5, launch, "one_shot"),
                        calls, replays)
    two = time_in_graph(lambda: ta.fused_allreduce_add_rms_norm(x, residual, weight, 1e-5, launch, "two_shot"),
                        calls, replays)
    chosen = ta.select(x, residual, weight, group).path
    return Row(tokens, hidden, nccl, one, two, chosen, {"nccl": nccl, "one_shot": one, "two_shot": two}[chosen])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDENS))
    parser.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    parser.add_argument("--replays", type=int, default=15, help="timed replays (the median is reported)")
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    group = dist.group.WORLD.group_name
    largest = max(args.tokens) * max(args.hidden) * 2
    ws = ta.workspace(group, torch.device("cuda", local), min_bytes=2 * largest)
    rows = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            rows.append(measure(tokens, hidden, group, ws, args.calls, args.replays))
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        print(f"{torch.cuda.get_device_name()} x{world}, torch {torch.__version__}, bf16, "
              f"{args.calls} calls per CUDA graph, median of {args.replays} replays (us per call)")
        print(f"{'tokens':>6} {'hidden':>6} {'nccl+norm':>10} {'one-shot':>9} {'two-shot':>9} {'best fused':>10} "
              f"{'chosen':>9} {'speedup':>8}")
        for r in rows:
            best = min(r.one_shot_us, r.two_shot_us)
            print(f"{r.tokens:>6} {r.hidden:>6} {r.nccl_us:>10.2f} {r.one_shot_us:>9.2f} {r.two_shot_us:>9.2f} "
                  f"{r.nccl_us / best:>9.2f}x {r.chosen:>9} {r.nccl_us / r.chosen_us:>7.2f}x")
        # the table entries these numbers support: the largest payload where each path beats the others (and NCCL)
        for path, col in (("one_shot", "one_shot_us"), ("two_shot", "two_shot_us")):
            wins = [r.tokens * r.hidden * 2 for r in rows
                    if getattr(r, col) <= min(r.nccl_us, r.one_shot_us, r.two_shot_us)]
            print(f"{path}: wins at payloads up to {max(wins) if wins else 0} bytes at TP {world}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
