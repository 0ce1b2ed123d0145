"""``round_as`` (the Triton kernels' rounding to bf16/fp16, done on the bits so no compiler folds it) against torch's
own casts, on the values where rounding is delicate: ties, subnormals, the largest finite values and just past
them, infinities and NaN. Runs under Triton's interpreter (CPU), where Triton is installed."""
import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch, triton, triton.language as tl
from fxpasses.ops.triton_rounding import round_as

@triton.jit
def kernel(X, Y, N, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, round_as(tl.load(X + i, mask=i < N), DTYPE), mask=i < N)

fails = []
for dtype, tl_dtype, big in ((torch.float16, tl.float16, 65504.0), (torch.bfloat16, tl.bfloat16, 3.3895e38)):
    edge = [0.0, 1.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 2 ** -14, 2 ** -24, 3 * 2 ** -25, 1e-30, big,
            65505.0, 65519.0, 65520.0, 70000.0, 1e30, 3.4e38, float("inf"), float("nan")]
    x = torch.tensor(edge + [-v for v in edge], dtype=torch.float32)
    x = torch.cat([x, torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 1e3])
    y = torch.empty_like(x)
    kernel[(1,)](x, y, x.numel(), DTYPE=tl_dtype, BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(dtype).float()
    bad = ~((y == want) | (y.isnan() & want.isnan()))
    if bad.any():
        fails.append((dtype, x[bad][:5].tolist(), y[bad][:5].tolist(), want[bad][:5].tolist()))
print("FAILS", fails)
raise SystemExit(1 if fails else 0)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not importable")
def test_round_as_equals_torch_casts():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
