"""The storage a value lives in, as the effect analysis, the verifier and the ordering edges see it: views and the
results of in-place ops both lead back to the buffer they write."""
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

import fxpasses
from fxpasses.effects import base_of, written_tensors
from fxpasses.verifier import written_inputs


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_a_write_through_an_in_place_result_writes_the_input():
    def f(x, z):
        y = x.add_(1)
        y.copy_(z)
        return x

    gm = make_fx(f, tracing_mode="fake")(torch.zeros(4), torch.ones(4))
    (copy,) = _nodes(gm, torch.ops.aten.copy_.default)
    (written,) = written_tensors(copy)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert base_of(written) is x and base_of(written.args[0]) is x
    view = make_fx(lambda x: x.view(2, 2).mul_(2), tracing_mode="fake")(torch.zeros(4))
    (mul,) = _nodes(view, torch.ops.aten.mul_.Tensor)
    assert base_of(mul).op == "placeholder"  # the in-place result of a view: the input's storage


def test_a_self_copy_is_not_an_input_write():
    """``copy_(x, x)`` writes x's own values: removing it loses no write, so the always-on check must not object."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(torch.ops.aten.copy_.default, (x, x))
    graph.output(x)
    assert written_inputs(graph) == frozenset()
    y = graph.placeholder("y")
    with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
        graph.call_function(torch.ops.aten.copy_.default, (x, y))
    assert written_inputs(graph) == frozenset({"x"})


def test_rewrite_keeps_the_write_after_an_in_place_op():
    """The issue's case 2 end to end: ``y.add_(1); y.copy_(x)`` leaves y equal to x."""
    def f(x, y):
        y.add_(1)
        y.copy_(x)
        return y * 2

    x, y = torch.randn(4), torch.zeros(4)
    gm, _ = fxpasses.rewrite(make_fx(f, tracing_mode="fake")(x, y))
    y_eager, y_rewritten = y.clone(), y.clone()
    expected = f(x, y_eager)
    torch.testing.assert_close(gm(x, y_rewritten), expected)
    torch.testing.assert_close(y_rewritten, y_eager)
