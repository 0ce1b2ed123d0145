"""``python -m fxpasses``: the command line.

``demo`` shows a parallel layout and moves a ``[hidden_states, residual]`` pair down the pipeline over real gloo
ranks on this machine, checking every value that arrives.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from fxpasses.mapping import Mapping, init_process_groups


def mapping_table(world_size: int, tp: int, pp: int) -> str:
    header = "| rank | tp_rank | pp_rank | tp_group | pp_group | prev | next |"
    rows = [header, "|" + "---|" * 7]
    for rank in range(world_size):
        m = Mapping(world_size=world_size, rank=rank, tp_size=tp, pp_size=pp)
        rows.append(
            f"| {rank} | {m.tp_rank} | {m.pp_rank} | {list(m.tp_group)} | {list(m.pp_group)} | "
            f"{m.prev_pp_rank if m.prev_pp_rank is not None else '-'} | "
            f"{m.next_pp_rank if m.next_pp_rank is not None else '-'} |"
        )
    return "\n".join(rows)


def relay_stage(rank: int, world_size: int, tp: int, hidden: int) -> dict:
    """One pipeline stage: receive the pair (except stage 0), add this stage's contribution, send it on."""
    m = Mapping(world_size=world_size, rank=rank, tp_size=tp, pp_size=world_size // tp)
    groups = init_process_groups(m)
    torch.manual_seed(m.tp_rank)
    if m.is_first_pp_rank:
        pair = [torch.randn(4, hidden), torch.zeros(4, hidden)]
    else:
        pair = [torch.empty(4, hidden), torch.empty(4, hidden)]
        torch.ops.fxp.pp_recv_tensors(pair, m.prev_pp_rank, groups.pp.group_name)
    received = [t.clone() for t in pair]
    hidden_states, residual = pair
    residual = residual + hidden_states
    hidden_states = hidden_states * (m.pp_rank + 2)
    if not m.is_last_pp_rank:
        torch.ops.fxp.pp_send_tensors([hidden_states, residual], m.next_pp_rank, groups.pp.group_name)
    return {"received": received, "stage": m.pp_rank}


def expected_at_stage(stage: int, tp_rank: int, hidden: int) -> list[torch.Tensor]:
    torch.manual_seed(tp_rank)
    h, r = torch.randn(4, hidden), torch.zeros(4, hidden)
    for s in range(stage):
        r = r + h
        h = h * (s + 2)
    return [h, r]


def demo(args: argparse.Namespace) -> int:
    from fxpasses.testing import RankPool

    world = args.tp * args.pp
    print(f"fxpasses demo: TP{args.tp} x PP{args.pp} on {world} gloo ranks (CPU)\n")
    print(mapping_table(world, args.tp, args.pp), "\n")
    t0 = time.perf_counter()
    print(f"starting {world} ranks ...", flush=True)
    with RankPool(world, timeout=120) as pool:
        print("sending [hidden_states, residual] down the pipeline (each rank joins when it has started)", flush=True)
        results = pool.run(relay_stage, args.tp, args.hidden)
    ok = True
    for rank, res in enumerate(results):
        m = Mapping(world_size=world, rank=rank, tp_size=args.tp, pp_size=args.pp)
        if m.is_first_pp_rank:
            status = "sent (first stage)"
        else:
            want = expected_at_stage(m.pp_rank, m.tp_rank, args.hidden)
            good = all(torch.equal(a, b) for a, b in zip(res["received"], want))
            ok &= good
            status = f"received from rank {m.prev_pp_rank}: {'exact' if good else 'WRONG'}"
        print(f"  rank {rank} (stage {m.pp_rank}, tp_rank {m.tp_rank}): {status}")
    print(f"\n{'OK' if ok else 'FAILED'}: pipeline relay in {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxpasses", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the demo on gloo ranks on this machine")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        Mapping(world_size=args.tp * args.pp, tp_size=args.tp, pp_size=args.pp)
    except ValueError as err:
        parser.error(str(err))
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
