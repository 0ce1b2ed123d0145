"""Shared test helper: compile with a Backend and keep the graph's ops before and after the pipeline."""
import torch

from fxpasses.testing import RecordingBackend


def compile_and_capture(fn, args, *, dynamic=None, fullgraph=False, **backend_kwargs):
    """Run ``fn`` compiled with a fresh recording Backend; return (output, backend, ops of the first graph before
    the pipeline, ops of the last graph after it)."""
    backend = RecordingBackend(**backend_kwargs)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)(*args)
    return out, backend, backend.before, backend.after


# bf16 results of a fused op and of the unfused eager code may differ by one rounding of the last product
BF16_TOL = dict(rtol=1.6e-2, atol=1.6e-2)
