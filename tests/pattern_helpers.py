"""Shared test helper: compile with a Backend and keep the graph's ops before and after the pipeline."""
import torch

import fxpasses
from fxpasses.testing import count_ops


def compile_and_capture(fn, args, *, dynamic=None, fullgraph=False, **backend_kwargs):
    """Run ``fn`` compiled with a fresh Backend; return (output, backend, ops before, ops after the pipeline)."""
    backend = fxpasses.Backend(**backend_kwargs)
    seen = {}
    original = backend.run_pipeline

    def spy(gm, *a, **k):
        seen.setdefault("before", count_ops(gm))
        out = original(gm, *a, **k)
        seen["after"] = count_ops(gm)
        return out

    backend.run_pipeline = spy
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)(*args)
    return out, backend, seen["before"], seen["after"]


# bf16 results of a fused op and of the unfused eager code may differ by one rounding of the last product
BF16_TOL = dict(rtol=1.6e-2, atol=1.6e-2)
