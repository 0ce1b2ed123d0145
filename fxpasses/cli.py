"""``python -m fxpasses``: the command line.

``demo`` compiles a reference model (tiny Llama by default) with fxpasses on TP×PP gloo ranks on this machine,
runs a prefill and decode steps, prints per rank what the pipeline fused and what it cost, and checks the
logits against a single-process eager model with the same weights. Exits 1 when they differ or a rank fused
something other than predicted.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import torch

from fxpasses.mapping import Mapping

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"


def rank_table(results: list) -> str:
    rows = ["| rank | stage | tp_rank | fused | as predicted | compile (s) | pipeline (ms) | slowest pass (ms) | graphs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        total = sum(r.pass_ms.values())
        slow = max(r.pass_ms.items(), key=lambda kv: kv[1]) if r.pass_ms else ("-", 0.0)
        rows.append(f"| {r.rank} | {r.mapping.pp_rank} | {r.mapping.tp_rank} | {_counts(r.matches)} | "
                    f"{'yes' if r.matches == r.predicted else 'NO, predicted ' + _counts(r.predicted)} | "
                    f"{r.compile_s:.2f} | {total:.1f} | {slow[0]} {slow[1]:.1f} | {r.graphs} |")
    return "\n".join(rows)


class Ticker:
    """Prints a line every few seconds while waiting, so a user never stares at a silent terminal."""

    def __init__(self, what: str, every: float = 5.0) -> None:
        self.what, self.every, self.t0 = what, every, time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            print(f"  ... {self.what} ({time.perf_counter() - self.t0:.0f} s)", flush=True)

    def __enter__(self) -> "Ticker":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def demo(args: argparse.Namespace, config: object) -> int:
    """Run the demo for a model ``config`` that ``main`` has already validated against the layout."""
    from fxpasses.demo import compare, reference_logits, run_rank
    from fxpasses.testing import RankPool

    world = args.tp * args.pp
    dtype = DTYPES[args.dtype]
    print(f"fxpasses demo: {args.model}, {args.layers} layers, {args.dtype}, TP{args.tp} x PP{args.pp} "
          f"on {world} gloo ranks (CPU); prefill + {args.steps} decode steps\n", flush=True)
    t0 = time.perf_counter()
    print(f"starting {world} ranks ...", flush=True)
    with RankPool(world, timeout=args.timeout) as pool, Ticker("ranks starting and compiling"):
        results = pool.run(run_rank, args.model, args.tp, args.pp, config, args.steps, args.dump,
                           on_progress=lambda rank, msg: print(f"  [rank {rank}] {msg}", flush=True))
    print(f"ranks done in {time.perf_counter() - t0:.1f} s; running the single-process eager reference ...\n",
          flush=True)
    reference = reference_logits(args.model, config, args.steps)
    print(rank_table(results), "\n")
    for r in results:
        for err in r.errors:
            print(f"rank {r.rank}: a pass failed and was rolled back:\n{err}")
    if args.verbose:
        for r in results:
            print(f"--- rank {r.rank} ---\n{r.report}\n")
    problems = compare(results, reference, dtype)
    mispredicted = [r.rank for r in results if r.matches != r.predicted]
    if args.dump:
        print(f"graphs before and after the pipeline: {args.dump}/rank<N>/graph0_{{before,after}}.py")
    last = [r.rank for r in results if r.logits is not None]
    if problems:
        print("FAILED: compiled logits differ from eager:\n  " + "\n  ".join(problems))
        return 1
    print(f"OK: logits of ranks {last} match the eager model at all {args.steps + 1} steps "
          f"({'rtol=atol=1e-4' if dtype == torch.float32 else 'rtol=atol=5e-2'})")
    if mispredicted:
        print(f"FAILED: ranks {mispredicted} fused something other than predicted")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxpasses", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a reference model on TP x PP gloo ranks and check it against eager")
    p.add_argument("--model", choices=["llama", "deepseek"], default="llama")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--steps", type=int, default=4, help="decode steps after the prefill")
    p.add_argument("--dump", metavar="DIR", help="write each rank's graphs before and after the pipeline here")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before every rank is killed")
    p.add_argument("-v", "--verbose", action="store_true", help="print each rank's full pipeline report")
    args = parser.parse_args(argv)
    from fxpasses.demo import make_config

    try:  # bad layouts fail here, with the reason, before any rank starts
        config = make_config(args.model, args.layers, DTYPES[args.dtype])
        config.validate(Mapping(world_size=args.tp * args.pp, tp_size=args.tp, pp_size=args.pp))
    except ValueError as err:
        parser.error(str(err))
    return demo(args, config)


if __name__ == "__main__":
    sys.exit(main())
