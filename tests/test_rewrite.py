"""fxpasses.rewrite on graphs captured without torch.compile: export, make_fx (functional or not), AOT export."""
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import fxpasses
from fxpasses.cleanup import remove_noop_ops
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


# ---- issue 11: in-place writes in captured graphs (make_fx and torch.export keep aten in-place ops) -------------
EPS = 1e-6
FP8 = torch.float8_e4m3fn


def _rms_written_between(x, w, cos, s):
    """x is read by the variance and again by the scaling; the write between (through a view, so the captured
    graph reads the same node x both times) means the norm is of two values."""
    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    x[1:3].mul_(2)
    return x * inv * w


def _add_rms_written_after_add(x, w, cos, s):
    r = x + cos
    inv = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS)
    x.mul_(2)  # the add read x before this write; a fusion placed at the norm must still read the old x
    return r * inv * w, r


def _silu_written_between(x, w, cos, s):
    g = F.silu(x)
    x.mul_(2)  # the example: s = F.silu(g); g.mul_(2); return s * u
    return g * cos


def _rope_written_between(x, w, cos, s):
    xc = x * cos
    cos.mul_(2)  # cos is read once, before this write; sin (here w broadcast) after
    x1, x2 = x.chunk(2, dim=-1)
    return xc + torch.cat((-x2, x1), dim=-1) * (cos - 1)


def _quant_written_between(x, w, cos, s):
    d = x.float() / s
    s.mul_(2)  # the scale is read by the division, before this write
    return d.clamp(-448.0, 448.0).to(FP8).float()


FAMILY_CASES = {  # program, the fusion expected on the canonical graph (None: the pattern is no longer there)
    "rms_norm": (_rms_written_between, None),
    "add_rms_norm": (_add_rms_written_after_add, "add_rms_norm"),
    "silu_and_mul": (_silu_written_between, "silu_and_mul"),
    "rotary_embedding": (_rope_written_between, "rotary_embedding"),
    "quant_fp8": (_quant_written_between, "quant_fp8"),
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, generator=g), torch.randn(8, generator=g), torch.randn(4, 8, generator=g),
            torch.tensor(0.02)]


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _capture(fn, how):
    if how == "make_fx":
        return make_fx(fn, tracing_mode="fake")(*_inputs())
    return torch.export.export(_Fn(fn), tuple(_inputs()))


def _assert_same_as_eager(gm, fn):
    want_in, got_in = _inputs(), _inputs()
    want, got = fn(*want_in), gm(*got_in)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_in, want_in):  # the inputs' final values (the writes) too
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["make_fx", "export"])
@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_no_fusion_reads_a_value_written_after_its_first_read(family, how):
    fn, expected = FAMILY_CASES[family]
    with torch.no_grad():
        gm, report = fxpasses.rewrite(_capture(fn, how), strict=True)
        _assert_same_as_eager(gm, fn)
    assert not report.errors
    if expected is None:
        assert family not in report.matches  # x * inv reads the written x: not an RMSNorm of one value
        return
    assert report.matches.get(expected) == 1, report.matches
    nodes = list(gm.graph.nodes)
    fused = next(n for n in nodes if n.op == "call_function" and n.target._schema.name == f"fxp::{expected}")
    writes = [n for n in nodes if n.op == "call_function" and n.target is torch.ops.aten.copy_.default]
    assert writes, "the input write must survive"
    # the fused op reads the inputs as they were: it runs before every write-back into them
    assert all(nodes.index(fused) < nodes.index(w) for w in writes)


@pytest.mark.parametrize("how", ["make_fx", "export"])
def test_copy_into_an_input_after_another_in_place_op_is_kept(how):
    def f(x, y):
        y.add_(1)
        y.copy_(x)
        return x + 0

    x, y = torch.randn(4), torch.randn(4)
    with torch.no_grad():
        captured = make_fx(f, tracing_mode="fake")(x, y.clone()) if how == "make_fx" else \
            torch.export.export(_Fn(f), (x, y.clone()))
        gm, report = fxpasses.rewrite(captured, strict=True)
    y2 = y.clone()
    gm(x, y2)
    assert torch.equal(y2, x)  # not y + 1
    assert count_ops(gm)["aten.copy_"] == 1


def test_cleanup_alone_follows_in_place_results():
    """On a graph nobody canonicalized, remove_noop_ops must see ``copy_(add_, x)`` as a write to y."""
    def f(x, y):
        y.add_(1)
        y.copy_(x)
        return x + 0

    x, y = torch.randn(4), torch.randn(4)
    gm = make_fx(f, tracing_mode="fake")(x, y.clone())
    remove_noop_ops(gm)
    gm.recompile()
    assert count_ops(gm)["aten.copy_"] == 1
    y2 = y.clone()
    gm(x, y2)
    assert torch.equal(y2, x)


def test_make_fx_with_real_tensors_fuses_quietly(caplog):
    def f(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    x, w = torch.randn(3, 8), torch.randn(8)
    for example_inputs in ([x, w], None):  # the graph's own metadata (one fake mode per node) also does
        with caplog.at_level(logging.INFO, logger="fxpasses"):
            gm, report = fxpasses.rewrite(make_fx(f)(x, w), example_inputs=example_inputs)
        assert report.matches == {"rms_norm": 1} and not report.errors
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        torch.testing.assert_close(gm(x, w), f(x, w))
        caplog.clear()


def test_rewrite_checks_mapping_and_example_inputs():
    gm = make_fx(lambda x, w: x * w, tracing_mode="fake")(torch.randn(2, 8), torch.randn(8))
    with pytest.raises(TypeError, match="rewrite: mapping must be a fxpasses.Mapping.*got str 'tp2'"):
        fxpasses.rewrite(gm, mapping="tp2")
    with pytest.raises(ValueError, match=r"example_inputs has 1 value\(s\) but the graph has 2 input\(s\) "
                                         r"\(x_1, w_1\)"):
        fxpasses.rewrite(gm, example_inputs=[torch.randn(2, 8)])
    with pytest.raises(TypeError, match="example_inputs must be a list or tuple"):
        fxpasses.rewrite(gm, example_inputs=torch.randn(2, 8))
    real = make_fx(lambda x: x + 1)(torch.randn(3))
    for n in real.graph.nodes:
        n.meta.pop("val", None)
    with pytest.raises(ValueError, match=r"carry no shape metadata.*pass example_inputs"):
        fxpasses.rewrite(real)


def test_graph_functionalization_refuses_is_returned_unchanged():
    def f(x):
        x.t_()  # changes an input's strides in place: no functional form keeps the caller's view of it
        return x * 2

    gm = make_fx(f, tracing_mode="fake")(torch.randn(2, 3))
    code = gm.code
    gm, report = fxpasses.rewrite(gm, patterns=[double_to_add])
    assert gm.code == code and report.errors and "not rewritten" in report.notes[0]
    with pytest.raises(fxpasses.PassError, match="shape, strides or storage changed in place"):
        fxpasses.rewrite(make_fx(f, tracing_mode="fake")(torch.randn(2, 3)), strict=True)


def test_outputs_that_alias_a_written_input_still_alias_it():
    def f(x):
        x.add_(1)
        return x, x[1], x * 2

    gm, _ = fxpasses.rewrite(make_fx(f, tracing_mode="fake")(torch.randn(3, 4)), strict=True)
    x = torch.randn(3, 4)
    want = f(x.clone())
    got = gm(x)
    torch.testing.assert_close(list(got), list(want))
    assert got[0] is x and got[1].data_ptr() == x[1].data_ptr()  # the caller sees the same aliasing as eager
    x = torch.randn(4, 3).t()  # a caller's strides the trace never saw: the view is x[1] of this x, as in eager
    got = gm(x)
    assert got[0] is x and torch.equal(got[1], x[1]) and got[1].data_ptr() == x[1].data_ptr()


def test_export_buffer_written_in_forward_is_written_back():
    class Cache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(4, 8))
            self.w = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            self.cache[1:3].add_(x[:2])
            h = self.cache * 1.0
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * self.w

    model, x = Cache().eval(), torch.randn(4, 8)
    with torch.no_grad():
        ep = torch.export.export(Cache().eval(), (x,))
        ep.module().load_state_dict(model.state_dict())
        gm, report = fxpasses.rewrite(ep, strict=True)
        gm.load_state_dict(model.state_dict())
        want = model(x)
        got = gm(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gm.cache, model.cache)  # the buffer write happened, once
    assert report.matches == {"rms_norm": 1}
    # export's input checks are kept (2.13: a _guards_fn submodule in the graph; 2.11: a pre-forward hook)
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        gm(torch.randn(5, 8))


def test_copy_of_an_input_onto_itself_is_not_taken_for_a_write_back():
    """Found by the property: make_fx records ``x.copy_(x)`` as a trailing ``copy_(x, x)``, which looked like an
    AOT write-back epilogue; the graph was left as captured and the verifier saw the self-copy's write vanish."""
    def f(x):
        y = x * 0.5
        x.copy_(x)
        return y

    gm, report = fxpasses.rewrite(make_fx(f, tracing_mode="fake")(torch.randn(4)), strict=True)
    assert report.passes[0].counts.get("retraced") == 1 and not report.errors
    x = torch.randn(4)
    torch.testing.assert_close(gm(x.clone()), f(x.clone()))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_custom_mutating_ops_mixed_with_aten_writes(v2):
    """Mutating custom ops (a receive, a scale through a slice, a list accumulate, a send) interleaved with aten
    writes through views: the same values, the same sends once each, the same aliasing as eager."""
    import fxptest_ops

    from fxpasses import compat

    fxt = torch.ops.fxptest

    def prog(x, cache):
        buf = torch.empty_like(x)
        fxt.fill_next(buf)
        view = cache[0]
        cache[1].add_(buf)
        s = fxt.scale_(cache[1:3], 2.0)
        buf.mul_(3)
        fxt.accumulate([buf, view], x)
        sink = torch.zeros(())
        fxt.emit(sink, buf * view)
        return buf + view + s.sum(), view

    x, cache = torch.randn(4), torch.randn(4, 4)
    with compat.set_auto_functionalized_v2(v2):
        gm, report = fxpasses.rewrite(make_fx(prog, tracing_mode="fake")(x, cache.clone()), strict=True)
    assert report.passes[0].counts["auto_functionalized"] == 4
    ops = count_ops(gm)
    assert all(ops[f"fxptest.{op}"] == 1 for op in ("fill_next", "scale_", "accumulate", "emit"))
    fxptest_ops.reset()
    want_cache = cache.clone()
    want = prog(x, want_cache)
    want_log = list(fxptest_ops.LOG)
    fxptest_ops.reset()
    got_cache = cache.clone()
    got = gm(x, got_cache)
    torch.testing.assert_close(list(got), list(want))
    torch.testing.assert_close(got_cache, want_cache)
    assert len(fxptest_ops.LOG) == len(want_log) and all(torch.equal(a, b) for a, b in zip(fxptest_ops.LOG, want_log))
    assert got[1].data_ptr() == got_cache[0].data_ptr()  # the returned view is still a view of the cache


def test_symbolic_shapes_make_fx_and_export():
    """Graphs with symbolic token counts are re-traced symbolically: one rewritten graph serves every size."""
    def f(g, u, w):
        s = F.silu(g)
        g.mul_(2)
        n = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + EPS) * w
        return s * u + n, g[0]

    w = torch.randn(8)
    sym = make_fx(f, tracing_mode="symbolic")(torch.randn(5, 8), torch.randn(5, 8), w)
    tokens = torch.export.Dim("tokens", min=2)

    class Three(torch.nn.Module):
        def forward(self, g, u, w):
            return f(g, u, w)

    ep = torch.export.export(Three(), (torch.randn(5, 8), torch.randn(5, 8), w),
                             dynamic_shapes=({0: tokens}, {0: tokens}, None))
    for captured in (sym, ep):
        gm, report = fxpasses.rewrite(captured, strict=True)
        assert report.matches == {"silu_and_mul": 1, "rms_norm": 1}
        for n in (3, 7):
            g, u = torch.randn(n, 8), torch.randn(n, 8)
            want_g, got_g = g.clone(), g.clone()
            want, got = f(want_g, u, w), gm(got_g, u, w)
            torch.testing.assert_close(list(got), list(want))
            assert torch.equal(got_g, want_g) and got[1].data_ptr() == got_g.data_ptr()


def test_a_copy_into_a_returned_intermediate_is_not_folded_into_the_input():
    """Found by the property: ``h = a * 0.5; h.view(4, 8).copy_(a); return h`` has h hold a's values, in h's own
    storage. No-op removal replaced the functional copy by ``a``, so the output was the caller's input itself."""
    def f(a):
        h = a * 0.5
        h.view(4, 8).copy_(a)
        return h

    gm, _ = fxpasses.rewrite(make_fx(f, tracing_mode="fake")(torch.randn(4, 8)), strict=True)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=fxpasses.Backend(strict=True), fullgraph=True)
    for fn in (gm, compiled):
        a = torch.randn(4, 8)
        with torch.no_grad():
            out = fn(a)
        assert torch.equal(out, a) and out.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
