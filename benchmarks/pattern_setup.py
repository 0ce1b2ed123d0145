"""Pattern registration time per Backend: cold (first Backend in a process traces every variant) and warm.

    python benchmarks/pattern_setup.py

Each cold number is measured in a fresh process. Prints a markdown table.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

COLD = """
import time, torch
t0 = time.perf_counter()
import fxpasses
t1 = time.perf_counter()
b = fxpasses.Backend()
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def main() -> None:
    colds = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, check=True).stdout.split()
        colds.append(float(out[-1]))
    import fxpasses
    from fxpasses import patterns

    fxpasses.Backend()
    warm = []
    for _ in range(20):
        t0 = time.perf_counter()
        fxpasses.Backend(fxpasses.Mapping(8, 3, 4, 2))
        warm.append(time.perf_counter() - t0)
    variants = sum(len(patterns.traced_variants(p.name)) for p in patterns.all())
    print("| patterns | traced variants | first Backend in a process (s) | each later Backend (ms) |")
    print("|---|---|---|---|")
    print(f"| {len(patterns.all())} | {variants} | {statistics.median(colds):.2f} | {statistics.median(warm) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
