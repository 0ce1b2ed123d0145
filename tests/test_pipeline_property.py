"""Property: on random programs mixing pure ops with sends, receives and in-place writes (on inputs and views),
the compiled pipeline keeps the outputs, the input mutations, and the side effects with their order."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpasses
import fxptest_ops
from fxpasses import compat

fxt = torch.ops.fxptest

step = st.one_of(
    st.tuples(st.just("pure"), st.sampled_from(["add", "mul", "sin"]), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("send"), st.integers(0, 9)),
    st.tuples(st.just("recv")),
    st.tuples(st.just("inplace_input"), st.integers(0, 1), st.floats(-2, 2, allow_nan=False, width=32)),
    st.tuples(st.just("inplace_view"), st.integers(0, 1), st.integers(0, 2), st.integers(0, 9)),
    st.tuples(st.just("scale_view"), st.integers(0, 1), st.integers(0, 2)),
    st.tuples(st.just("accumulate"), st.integers(0, 9)),
)


def make_program(steps):
    def program(x, y):
        inputs = [x, y]
        slots = [x * 1, y + 0]
        sink = torch.zeros(())
        for s in steps:
            kind = s[0]
            if kind == "pure":
                a, b = slots[s[2] % len(slots)], slots[s[3] % len(slots)]
                slots.append({"add": torch.add, "mul": torch.mul}[s[1]](a, b) if s[1] != "sin" else torch.sin(a))
            elif kind == "send":
                fxt.emit(sink, slots[s[1] % len(slots)])
            elif kind == "recv":
                buf = torch.empty(4, 4)
                fxt.fill_next(buf)
                slots.append(buf)
            elif kind == "inplace_input":
                inputs[s[1]].add_(s[2])
                slots.append(inputs[s[1]] * 1)  # read the input after its mutation
            elif kind == "inplace_view":
                view = inputs[s[1]][s[2]:s[2] + 2]
                view.mul_(slots[s[3] % len(slots)][:2])
            elif kind == "scale_view":
                total = fxt.scale_(inputs[s[1]][s[2]:s[2] + 2], 0.5)
                slots.append(slots[-1] + total.sum())
            elif kind == "accumulate":
                fxt.accumulate([slots[-1], inputs[0][1]], slots[s[1] % len(slots)][0] * 1)
        return torch.stack([t.sum() for t in slots]) + sink

    return program


def run(fn, seed):
    fxptest_ops.reset()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    out = fn(x, y)
    return out, (x, y), [t.clone() for t in fxptest_ops.LOG], fxptest_ops.COUNTER[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=10), st.booleans(), st.integers(0, 1000))
def test_pipeline_keeps_numbers_side_effects_and_order(steps, v2, seed):
    program = make_program(steps)
    want_out, want_inputs, want_log, want_recvs = run(program, seed)
    backend = fxpasses.Backend(strict=True)
    torch._dynamo.reset()
    with compat.set_auto_functionalized_v2(v2), torch.no_grad():
        compiled = torch.compile(program, backend=backend, fullgraph=True)
        got_out, got_inputs, got_log, got_recvs = run(compiled, seed)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_inputs, want_inputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got_recvs == want_recvs  # every receive ran exactly once
    assert len(got_log) == len(want_log)  # every send ran exactly once ...
    for a, b in zip(got_log, want_log):  # ... in the same order, with the same values
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not backend.report.errors
    # AOT's graphs never read a pre-mutation value late, so every auto_functionalized node became a direct call
    assert not [n for r in backend.report.passes if r.name.endswith("/defunctionalize") for n in r.notes]
