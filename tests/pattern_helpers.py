"""Shared test helpers: compile with a Backend and keep the graph's ops before and after the pipeline; a tiny pass
and a tiny model that the Backend, compile-cache and precompile tests share."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxpasses.passes import PassResult
from fxpasses.testing import RecordingBackend


def compile_and_capture(fn, args, *, dynamic=None, fullgraph=False, **backend_kwargs):
    """Run ``fn`` compiled with a fresh recording Backend; return (output, backend, ops of the first graph before
    the pipeline, ops of the last graph after it)."""
    backend = RecordingBackend(**backend_kwargs)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)(*args)
    return out, backend, backend.before, backend.after


def fake_cuda(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor like ``t`` on CUDA (call under a FakeTensorMode on a machine without a GPU)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


def aot_graph_on_cpu(fn, *args, grad_mode=torch.no_grad):
    """Compile ``fn`` on the CPU with a backend that keeps the AOT graph and copies of its first call's real inputs
    (taken before the call, so inputs the graph writes, such as a KV cache, hold what it read). Returns (graph,
    inputs, the compiled call's output)."""
    from functorch.compile import aot_module_simplified, make_boxed_func

    graphs = []

    def backend(gm, example_inputs):
        def keep(g, _):
            real = []

            def run(*call_args):
                if not real:
                    real.extend(a.clone() for a in call_args)
                return g(*call_args)

            graphs.append((g, real))
            return make_boxed_func(run)

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep)

    torch._dynamo.reset()
    with grad_mode():
        out = torch.compile(fn, backend=backend)(*args)
    assert len(graphs) == 1
    return graphs[0][0], graphs[0][1], out


def point_graph_at(gm: torch.fx.GraphModule, device: str) -> None:
    """Point the graph's factory and copy calls (arange, .to(device=...)) at ``device``, dropping the fake values
    (re-derived from the next inputs it is traced with)."""
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": torch.device(device)}
        node.meta.pop("val", None)
    gm.recompile()


# bf16 results of a fused op and of the unfused eager code may differ by one rounding of the last product
BF16_TOL = dict(rtol=1.6e-2, atol=1.6e-2)


def double_to_add(gm, ctx):
    """A tiny pattern of our own: ``x * 2`` -> ``x + x``."""
    result = PassResult()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.mul.Tensor and node.args[1] == 2:
            with gm.graph.inserting_before(node):
                add = gm.graph.call_function(torch.ops.aten.add.Tensor, (node.args[0], node.args[0]))
            add.meta.update(node.meta)
            node.replace_all_uses_with(add)
            gm.graph.erase_node(node)
            result.count("double_to_add")
    return result


class LinearWithCache(torch.nn.Module):
    """A linear, a doubling (what double_to_add rewrites) and a cache written in place at the given slots (an input
    mutation)."""

    def __init__(self, slots: int = 16):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("cache", torch.zeros(slots, 8))

    def forward(self, x, slots):
        h = self.lin(x) * 2
        self.cache.index_copy_(0, slots, h)
        return h.relu() + self.cache.sum()


ROOT = Path(__file__).resolve().parent.parent


def run_fresh_process(code: str, *args: str, **env: str) -> dict:
    """Run ``code`` in a new Python process (a server restart) from the repository root, with extra environment
    variables, and return the JSON object its last line of output prints."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), **env), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TRITON_SITE = os.environ.get("FXPASSES_TRITON_SITE", "")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None and not TRITON_SITE,
                                  reason="needs Triton (installed, or its site directory in FXPASSES_TRITON_SITE)")


def run_under_triton_interpreter(module: str, function: str = "interpreter_checks", interpret: bool = True) -> None:
    """Run ``module.function()`` in a new process, under Triton's interpreter (``TRITON_INTERPRET=1``: the kernels
    run on CPU tensors) or, with ``interpret=False``, without it (ahead-of-time compiles for a GPU target), with
    Triton from ``FXPASSES_TRITON_SITE`` where this venv has none (the CI machine's CPU torch ships no Triton)."""
    path = os.pathsep.join(p for p in (TRITON_SITE, str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", ""))
                           if p)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=path, **({"TRITON_INTERPRET": "1"} if interpret else {}))
    code = f"import {module} as t; t.{function}(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
