"""defunctionalize / functionalize through real torch.compile, real AOT, make_fx and hand-edited graphs."""

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

import fxpasses
import fxptest_ops
from fxpasses import compat
from fxpasses.testing import count_ops, op_names
from pattern_helpers import compile_and_capture

fxt = torch.ops.fxptest


def program(x, y, cache):
    """Receive, compute, mutate an input through a view and a list, send a value nobody reads again."""
    buf = torch.empty_like(x)
    fxt.fill_next(buf)
    h = x * 2 + buf
    total = fxt.scale_(cache[1:3], 3.0)  # op with a return, mutating a view of an input
    fxt.accumulate([y, cache[0]], h[0])  # list argument: an input and a view of another
    sink = torch.zeros(())
    fxt.emit(sink, h)  # the send: its buffer is never read again
    return h.sum() + total.sum()


def fresh_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, generator=g), torch.randn(4, generator=g), torch.randn(4, 4, generator=g)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_compile_defunctionalizes_every_form(v2):
    fxptest_ops.reset()
    eager_in = fresh_inputs()
    expected = program(*eager_in)
    expected_log = [t.clone() for t in fxptest_ops.LOG]
    fxptest_ops.reset()
    compiled_in = fresh_inputs()
    with compat.set_auto_functionalized_v2(v2):
        got, backend, before, after = compile_and_capture(program, compiled_in, fullgraph=True)
    hop = "auto_functionalized_v2" if v2 else "auto_functionalized"
    assert before[f"{hop}(fxptest.emit)"] == 1 and before[f"{hop}(fxptest.scale_)"] == 1
    assert not any(k.startswith("auto_functionalized") for k in after), after
    for op in ("fxptest.fill_next", "fxptest.emit", "fxptest.scale_", "fxptest.accumulate"):
        assert after[op] == 1, (op, after)
    assert after.get("aten.copy_", 0) == 0  # every write-back became a direct in-place write
    torch.testing.assert_close(got, expected)
    for a, b in zip(compiled_in, eager_in):  # inputs mutated exactly as eager mutates them
        torch.testing.assert_close(a, b)
    assert len(fxptest_ops.LOG) == 1 and torch.equal(fxptest_ops.LOG[0], expected_log[0])
    report = backend.report
    assert not report.errors
    defunc = [r for r in report.passes if r.name == "defunctionalize/defunctionalize"][0]
    assert defunc.counts["defunctionalized"] == 4 and not defunc.notes


def test_pre_mutation_read_is_left_functional_and_reported():
    """A reader of the old value placed after the op (as a careless pass could) keeps the node functional."""
    def f(x):
        buf = x.clone()
        fxt.fill_next(buf)
        return buf + 1

    fxptest_ops.reset()
    gm = make_fx(f, tracing_mode="fake")(torch.ones(3))
    fxpasses.functionalize(gm)
    graph = gm.graph
    hop = next(n for n in graph.nodes if n.target is compat.auto_functionalized_ops()[1])
    clone = hop.kwargs["_all_bases"][0]
    with graph.inserting_after(hop):
        stale = graph.call_function(torch.ops.aten.mul.Tensor, (clone, 10))
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = ((out.args[0], stale),)
    gm.recompile()
    result = fxpasses.defunctionalize(gm)
    assert result.counts.get("defunctionalized", 0) == 0
    assert "reads clone (the value from before the op) after it" in result.notes[0]
    fxptest_ops.reset()
    new, old = gm(torch.full((3,), 5.0))
    assert torch.equal(new, torch.ones(3)) and torch.equal(old, torch.full((3,), 50.0))


def direct_program(x, cache):
    buf = torch.empty_like(x)
    fxt.fill_next(buf)
    view = cache[0]
    s = fxt.scale_(cache[1:3], 2.0)
    fxt.accumulate([buf, view], x)
    sink = torch.zeros(())
    fxt.emit(sink, buf * view)
    return buf + view + s.sum()


def test_functionalize_then_defunctionalize_round_trips_op_for_op():
    x, cache = torch.randn(4), torch.randn(4, 4)
    gm = make_fx(direct_program, tracing_mode="fake")(x, cache)
    original = op_names(gm)
    res = fxpasses.functionalize(gm)
    assert res.counts == {"functionalized": 4, "input_writebacks": 1}
    functional = count_ops(gm)
    assert functional["auto_functionalized_v2(fxptest.accumulate)"] == 1
    assert not any(k in functional for k in ("fxptest.emit", "fxptest.fill_next", "fxptest.scale_"))
    fxpasses.defunctionalize(gm)
    from fxpasses.dependency import eliminate_dead_code

    eliminate_dead_code(gm)
    gm.recompile()
    assert op_names(gm) == original


def test_functionalize_rewires_readers_and_keeps_numbers():
    x, cache = torch.randn(4), torch.randn(4, 4)
    gm = make_fx(direct_program, tracing_mode="fake")(x, cache)
    fxpasses.functionalize(gm)
    gm.recompile()
    fxptest_ops.reset()
    c1 = cache.clone()
    expected = direct_program(x, c1)
    log_eager = list(fxptest_ops.LOG)
    fxptest_ops.reset()
    c2 = cache.clone()
    got = gm(x, c2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(c2, c1)  # the copy_ epilogue writes the input back
    assert len(fxptest_ops.LOG) == 1 and torch.equal(fxptest_ops.LOG[0], log_eager[0])
    # every reader after a mutation reads the HOP's new value, none reads the stale base
    hop_v2 = compat.auto_functionalized_ops()[1]
    for hop in (n for n in gm.graph.nodes if n.target is hop_v2):
        for base in hop.kwargs["_all_bases"]:
            later = [u for u in base.users if u is not hop and list(gm.graph.nodes).index(u) > list(gm.graph.nodes).index(hop)]
            assert all(u.target is torch.ops.aten.copy_.default for u in later), later


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_mutated_input_and_pp_ops_compile(v2):
    """pp_send of a buffer nobody reads and pp_recv whose value flows on, under the fake process group."""
    from fxpasses.testing import fake_process_group

    def f(x):
        buf = torch.empty_like(x)
        torch.ops.fxp.pp_recv(buf, 1, "0")
        y = x * 3 + buf
        torch.ops.fxp.pp_send_tensors([y, x], 1, "0")
        return y.sum()

    with fake_process_group(2, 0), compat.set_auto_functionalized_v2(v2):
        _, _, _, after = compile_and_capture(f, (torch.ones(4),), fullgraph=True)
    assert after["fxp.pp_recv"] == 1 and after["fxp.pp_send_tensors"] == 1
    assert not any(k.startswith("auto_functionalized") for k in after)
