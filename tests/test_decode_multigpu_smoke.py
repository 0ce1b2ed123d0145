"""benchmarks/decode_multigpu.py on CPU: the script's whole logic (two real gloo ranks per layout, TP2 and PP2, the
per-step barrier timing, the eager reference, the logits check and the tables) runs on the tiny config, so CI
catches a broken benchmark before a multi-GPU machine is spent on it. The CUDA-only modes (CUDA graphs) are
refused on CPU with a clear message; their GPU run is ``python benchmarks/decode_multigpu.py`` on 2+ GPUs."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "decode_multigpu.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("decode_multigpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def _table(stdout: str, layout: str) -> list[list[str]]:
    """The rows of a layout's markdown table, each a list of cells."""
    section = stdout.split(f", {layout} (", 1)[1].split("\n### ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")]


@pytest.mark.slow
@pytest.mark.multirank
def test_tiny_tp2_and_pp2_over_gloo_print_tables_with_logits_equal_to_eager():
    proc = _run("--tiny", "--device", "cpu", "--backend", "gloo", "--layers", "2", "--tokens", "1", "2",
                "--steps", "2", "--warmup", "1", "--mark", "unbacked")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "MISMATCH" not in out and "FAILED" not in out, out
    for layout in ("TP2", "PP2"):
        rows = {row[0]: row for row in _table(out, layout)}
        assert set(rows) == {"eager", "fxpasses"}, out
        for row in rows.values():
            times = [float(x) for x in row[2:4]]  # 1 and 2 tokens
            assert all(t > 0 for t in times), row
        assert rows["eager"][-1] == "reference"
        diff, largest = map(float, re.fullmatch(r"(\S+) \(of max (\S+)\)", rows["fxpasses"][-1]).groups())
        assert largest > 0 and diff <= 5e-2 * largest, rows["fxpasses"]
    # every rank fused what the config predicts (one graph per rank: the token dimension is unbacked)
    assert out.count("every rank's matches as predicted") == 2, out
    assert "allreduce_add_rms_norm=" in out.split(", PP2 (")[0]  # TP2 fuses the all_reduce, PP2 has none
    # both stages of PP2 are timed; the layout's number is the last stage's (it waits for the first)
    assert re.search(r"rank 0 \(pp 0\) [\d.]+ ms, rank 1 \(pp 1\) [\d.]+ ms", out), out


def test_cpu_refuses_cuda_graph_modes_and_nccl_with_a_clear_error():
    proc = _run("--tiny", "--device", "cpu", "--modes", "eager", "fxpasses+full-cudagraphs", timeout=120)
    assert proc.returncode == 2 and "need CUDA" in proc.stderr and "--modes" in proc.stderr, proc.stderr
    proc = _run("--tiny", "--device", "cpu", "--backend", "nccl", timeout=120)
    assert proc.returncode == 2 and "--backend nccl needs --device cuda" in proc.stderr, proc.stderr


def test_logits_check_flags_a_difference_above_tolerance_loudly(capsys):
    mod = _load_script()
    ref = torch.linspace(-4, 4, 64).reshape(2, 32).to(torch.bfloat16)
    assert mod.compare(2, ref.clone(), ref, tol=5e-2).ok
    close = mod.compare(2, ref + 0.1, ref, tol=5e-2)  # 0.1 <= 5e-2 * 4
    assert close.ok and close.max_abs_diff == pytest.approx(0.1, rel=0.05)
    far = mod.compare(2, ref + 0.5, ref, tol=5e-2)
    assert not far.ok and far.max_abs_diff == pytest.approx(0.5, rel=0.05)
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert not mod.compare(2, nan, ref, tol=5e-2).ok

    task = mod.Task("tiny", None, 1, 2, (2,), 32, ("eager", "fxpasses"), "cpu", 1, 0, "dynamic", 5e-2)
    ranks = [mod.RankResult(r, 0, r, r == 1, 0, 0, 0.0, [mod.ModeResult("eager", [1.0]),
                                                         mod.ModeResult("fxpasses", [0.5], 1.0)]) for r in range(2)]
    ranks[1].modes[1].checks.append(far)
    assert mod.print_layout("pp2", task, ranks, "header") is False
    out = capsys.readouterr().out
    assert "LOGITS MISMATCH: pp2 fxpasses rank 1 at 2 tok" in out
    assert re.search(r"\| fxpasses \| 1\.0 \| 0\.50 \| - \| 0\.5\d* \(of max 4\) \|", out), out
