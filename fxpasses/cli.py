"""``python -m fxpasses``: the command line.

``demo`` compiles a reference model (tiny Llama by default) with fxpasses on TP×PP gloo ranks on this machine,
runs a prefill and decode steps, prints per rank what the pipeline fused and what it cost, and checks the
logits against a single-process eager model with the same weights. Exits 1 when they differ or a rank fused
something other than predicted.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from typing import Callable, NoReturn

import torch

from fxpasses.mapping import Mapping

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the line names the flag and what to change, with no usage block above it
    (the layout errors are long already; ``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer of at least ``low``; argparse prefixes the message with the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse ``type`` for a timeout: a finite number of seconds above zero (0 would kill every rank at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text}")
    return value


def check_dump_dir(path: str) -> str | None:
    """Create the ``--dump`` directory now, before any rank starts; the reason it cannot be, or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path!r} is an existing file, not a directory; name a directory (it is created if missing)"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        return f"cannot create directory {path!r}: {err.strerror}; name a directory you can write to"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"directory {path!r} is not writable; name a directory you can write to"
    return None


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
    try:
        with RankPool(world, timeout=args.timeout) as pool, Ticker("ranks starting and compiling"):
            results = pool.run(run_rank, args.model, args.tp, args.pp, config, args.steps, args.dump,
                               on_progress=lambda rank, msg: print(f"  [rank {rank}] {msg}", flush=True))
    except TimeoutError as err:
        print(f"FAILED: {err} Raise --timeout (it was {args.timeout:g} s).", file=sys.stderr)
        return 1
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
    """Parse ``argv`` and run the command. Bad arguments exit with status 2 and one line naming the flag, before
    any rank starts (argparse's ``SystemExit``)."""
    parser = Parser(prog="fxpasses", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a reference model on TP x PP gloo ranks and check it against eager")
    p.add_argument("--model", choices=["llama", "deepseek"], default="llama")
    p.add_argument("--tp", type=int_at_least(1), default=2, help="tensor-parallel ranks per stage")
    p.add_argument("--pp", type=int_at_least(1), default=2, help="pipeline stages")
    p.add_argument("--layers", type=int_at_least(1), default=4, help="decoder layers, at least one per stage")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--steps", type=int_at_least(0), default=4, help="decode steps after the prefill (0: prefill only)")
    p.add_argument("--dump", metavar="DIR", help="write each rank's graphs before and after the pipeline here")
    p.add_argument("--timeout", type=positive_seconds, default=300.0, help="seconds before every rank is killed")
    p.add_argument("-v", "--verbose", action="store_true", help="print each rank's full pipeline report")
    args = parser.parse_args(argv)
    from fxpasses.demo import make_config, max_decode_steps

    if args.layers < args.pp:
        p.error(f"argument --layers: {args.layers} layers cannot be split over --pp {args.pp} pipeline stages; "
                f"use --layers {args.pp} or more, or --pp {args.layers} or fewer")
    try:  # bad layouts fail here, with the reason, before any rank starts
        config = make_config(args.model, args.layers, DTYPES[args.dtype])
        config.validate(Mapping(world_size=args.tp * args.pp, tp_size=args.tp, pp_size=args.pp))
    except ValueError as err:
        p.error(f"--model {args.model} does not fit --tp {args.tp} --pp {args.pp}: {err}")
    if args.steps > max_decode_steps(config):
        p.error(f"argument --steps: {args.steps} decode steps outgrow the model's KV cache ({config.max_len} "
                f"positions per sequence); use --steps {max_decode_steps(config)} or fewer")
    if args.dump is not None and (reason := check_dump_dir(args.dump)):
        p.error(f"argument --dump: {reason}")
    return demo(args, config)


if __name__ == "__main__":
    sys.exit(main())
