"""fxpasses.rewrite on graphs captured without torch.compile: export, make_fx (functional or not), AOT export."""
import pytest
import torch
import torch.distributed as dist
from torch.fx.experimental.proxy_tensor import make_fx

import fxpasses
from fxpasses.testing import count_ops, fake_process_group
from test_backend import double_to_add


class Stage(torch.nn.Module):
    """One pipeline stage: receive, compute, in-place all_reduce, send, with asserts export adds."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        buf = torch.zeros_like(x)  # the fake backend's receive writes nothing
        torch.ops.fxp.pp_recv(buf, 1, "0")
        y = (x + buf) * self.w * 2
        dist.all_reduce(y)
        torch.ops.fxp.pp_send(y, 1, "0")
        return y.float().view(-1) + 1


@pytest.fixture
def world():
    with fake_process_group(2, 0) as w:
        yield w


def test_export_then_rewrite_same_numbers(world):
    model = Stage().eval()
    x = torch.randn(8)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        expected = model(x)
    before = count_ops(ep.module())
    gm, report = fxpasses.rewrite(ep, patterns=[double_to_add])
    after = count_ops(gm)
    assert before["aten._assert_tensor_metadata"] >= 1 and after["aten._assert_tensor_metadata"] == 0
    assert before["aten.copy_"] == 1 and after["aten.copy_"] == 0  # the in-place all_reduce's copy is folded
    assert after["fxp.pp_recv"] == after["fxp.pp_send"] == 1 and after["_c10d_functional.all_reduce"] == 1
    assert not any(k.startswith("auto_functionalized") for k in after)
    assert report.matches == {"double_to_add": 1} and not report.errors
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected)  # same calling convention as the exported module


def test_make_fx_non_functional_graph(world):
    def f(x):
        buf = torch.zeros_like(x)
        torch.ops.fxp.pp_recv(buf, 1, "0")
        h = buf * 2 + x
        torch.ops.fxp.pp_send_tensors([h, x], 1, "0")
        return h

    x = torch.randn(4)
    gm = make_fx(f, tracing_mode="fake")(x)
    gm, report = fxpasses.rewrite(gm, patterns=[double_to_add])
    ops = count_ops(gm)
    assert ops["fxp.pp_recv"] == 1 and ops["fxp.pp_send_tensors"] == 1 and ops["aten.mul.Tensor"] == 0
    canonical = [r for r in report.passes if r.name == "canonicalize/canonicalize"][0]
    # both custom ops auto_functionalized; the send's schema says it writes x (a graph input): a write-back,
    # which defunctionalization turns back into the send writing x itself
    assert canonical.counts["auto_functionalized"] == 2 and canonical.counts["input_writebacks"] == 1
    assert ops.get("aten.copy_", 0) == 0
    torch.testing.assert_close(gm(x), f(x))


def test_make_fx_real_tensors_get_metadata_from_example_inputs(world):
    def f(x):
        return x * 2 + 1

    x = torch.randn(5)
    gm = make_fx(f)(x)
    for n in gm.graph.nodes:
        n.meta.pop("val", None)
    gm, report = fxpasses.rewrite(gm, patterns=[double_to_add], example_inputs=(x,))
    assert report.matches == {"double_to_add": 1}
    torch.testing.assert_close(gm(x), f(x))


def test_aot_export_graph(world):
    from torch._functorch.aot_autograd import aot_export_module

    from torch.distributed import _functional_collectives as funcol

    class TupleOut(torch.nn.Module):
        """Functional all_reduce (in-place c10d ops become with_effects tokens here); tuple outputs."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            buf = torch.zeros_like(x)
            torch.ops.fxp.pp_recv(buf, 1, "0")
            y = funcol.all_reduce((x + buf) * self.w * 2, "sum", dist.group.WORLD)
            torch.ops.fxp.pp_send(y, 1, "0")
            return (y + 1,)

    model = TupleOut().eval()
    x = torch.randn(8)
    with torch.no_grad():
        gm, sig = aot_export_module(model, (x,), trace_joint=False)
        (expected,) = model(x)
    assert any(k.startswith("auto_functionalized") for k in count_ops(gm))
    gm, report = fxpasses.rewrite(gm, patterns=[double_to_add])
    ops = count_ops(gm)
    assert ops["fxp.pp_recv"] == ops["fxp.pp_send"] == 1 and report.matches == {"double_to_add": 1}
    params = [dict(model.named_parameters())[n] for n in sig.parameters]
    with torch.no_grad():
        (out,) = gm(*params, x)
    torch.testing.assert_close(out, expected)


def test_rewrite_rejects_other_objects():
    with pytest.raises(TypeError, match="expected a torch.export.ExportedProgram or a torch.fx.GraphModule, got function"):
        fxpasses.rewrite(lambda x: x)
