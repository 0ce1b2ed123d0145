"""The safety net that always runs (issue 11): whatever a pass does to the graph, the pipeline checks it, rolls it
back and says why, or (strict) raises ``PassError`` chained to the cause; the rollback itself never crashes.

Every broken pass below is checked with the verifier off (the library's default; the suite turns it on for other
tests), through ``torch.compile`` with ``Backend(extra_passes=...)`` and through ``PassManager`` directly.
"""
import re

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

import fxpasses
from fxpasses import PassContext, PassError, PassManager, PassResult, PipelineConfig, Stage, VerificationError

aten = torch.ops.aten


def model(x, buf):
    buf.add_(1)  # an input mutation: the pipeline must keep it
    return torch.relu(x * 2 + buf)


def make_inputs():
    return torch.linspace(-1, 1, 12).reshape(3, 4), torch.arange(12.0).reshape(3, 4)


# ---- broken passes -----------------------------------------------------------------------------------------------
def _output(gm):
    """The output node and the (first) value it returns."""
    out = gm.graph.output_node()
    values = []
    torch.fx.node.map_arg(out.args, values.append)
    return out, values[0]


def _swap_output(gm, make):
    out, value = _output(gm)
    with gm.graph.inserting_before(out):
        new = make(value)
    out.replace_input_with(value, new)


def make_cycle(gm, ctx):
    """The returned value's input now reads the returned value: a two-node cycle."""
    _, value = _output(gm)
    producer = value.all_input_nodes[0]
    producer.replace_input_with(producer.all_input_nodes[0], value)
    return PassResult(modified=True)


def output_to_half(gm, ctx):
    """Returns the output in float16, and leaves no meta['val'] on the new node (the check infers it)."""
    _swap_output(gm, lambda v: gm.graph.call_function(aten._to_copy.default, (v,), {"dtype": torch.float16}))
    return PassResult(modified=True)


def output_unsqueezed(gm, ctx):
    """Returns the output with a leading dimension of 1, with correct meta['val']."""
    def make(v):
        new = gm.graph.call_function(aten.unsqueeze.default, (v, 0))
        new.meta["val"] = v.meta["val"].unsqueeze(0)
        return new

    _swap_output(gm, make)
    return PassResult(modified=True)


def output_transposed_copy(gm, ctx):
    """Same values, same shape, but column-major: only the stride tells."""
    def make(v):
        t = gm.graph.call_function(aten.t.default, (v,))
        c = gm.graph.call_function(aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
        back = gm.graph.call_function(aten.t.default, (c,))
        t.meta["val"] = v.meta["val"].t()
        c.meta["val"] = t.meta["val"].clone(memory_format=torch.contiguous_format)
        back.meta["val"] = c.meta["val"].t()
        return back

    _swap_output(gm, make)
    return PassResult(modified=True)


def drop_input_write(gm, ctx):
    """Loses the write to ``buf``: the copy_ epilogue of a functional graph, or the in-place add of a make_fx graph."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not node.args or getattr(node.args[0], "op", None) != "placeholder":
            continue
        if node.target is aten.copy_.default:
            node.replace_all_uses_with(node.args[1])
            gm.graph.erase_node(node)
            return PassResult(modified=True)
        if node.target is aten.add_.Tensor:
            node.target = aten.add.Tensor
            return PassResult(modified=True)
    raise AssertionError("test setup: no write to a graph input found")


def raises_half_way(gm, ctx):
    _, value = _output(gm)
    value.target = aten.neg.default  # a half-done edit, then a crash
    raise RuntimeError("this pass is broken")


def wrecks_the_graph(gm, ctx):
    """A cycle, an erased node and a new, empty graph object: the rollback may rely on nothing of the broken graph."""
    make_cycle(gm, ctx)
    old = gm.graph
    placeholder = next(iter(old.nodes))
    victim = next(n for n in old.nodes if n.op == "call_function" and not n.users)
    old.erase_node(victim)
    placeholder.name = "renamed"
    gm.graph = torch.fx.Graph()
    raise RuntimeError("wrecked")


BROKEN = [
    (make_cycle, VerificationError, r"dependency cycle"),
    (output_to_half, VerificationError, r"output 0 \(\w+\) dtype changed from torch.float32 to torch.float16"),
    (output_unsqueezed, VerificationError, r"output 0 \(\w+\) shape changed from \[3, 4\] to \[1, 3, 4\]"),
    (output_transposed_copy, VerificationError, r"output 0 \(\w+\) stride changed from \[4, 1\] to \[1, 3\]"),
    (drop_input_write, VerificationError, r"graph input mutation changed: no longer writes \['\w+'\]"),
    (raises_half_way, RuntimeError, r"this pass is broken"),
]
IDS = [p.__name__ for p, _, _ in BROKEN]


def eager():
    x, buf = make_inputs()
    return model(x, buf), buf


def compile_with(bad_pass, *, strict, verify=False):
    backend = fxpasses.Backend(extra_passes=[bad_pass], strict=strict, verify=verify, cache=False)  # run the pipeline
    torch._dynamo.reset()
    x, buf = make_inputs()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x, buf)
    return backend, out, buf


def error_chain(err):
    chain = []
    while err is not None:
        chain.append(err)
        err = getattr(err, "inner_exception", None) or err.__cause__
    return chain


# ---- through torch.compile -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_pass, cause, reason", BROKEN, ids=IDS)
def test_backend_rolls_back_and_reports(bad_pass, cause, reason):
    backend, out, buf = compile_with(bad_pass, strict=False)
    want_out, want_buf = eager()
    assert torch.equal(out, want_out) and out.stride() == want_out.stride()
    assert torch.equal(buf, want_buf)  # the input mutation happened, once
    (record,) = backend.report.errors
    assert record.name == f"user/{bad_pass.__name__}" and not record.changed
    assert re.search(reason, record.error), record.error
    assert f"{cause.__name__}" in record.error
    assert "FAILED, rolled back" in str(backend.report)
    passes_run = [r for r in backend.report.passes if not r.name.startswith("checks/")]
    (checks,) = [r for r in backend.report.passes if r.name == "checks/invariants"]
    assert checks.counts["passes"] == len(passes_run) - (cause is RuntimeError)  # a pass that raised was not checked


@pytest.mark.parametrize("verify", [False, True], ids=["verify_off", "verify_on"])
@pytest.mark.parametrize("bad_pass, cause, reason", BROKEN, ids=IDS)
def test_backend_strict_raises_pass_error_from_the_cause(bad_pass, cause, reason, verify):
    with pytest.raises(Exception, match=bad_pass.__name__) as info:
        compile_with(bad_pass, strict=True, verify=verify)
    chain = error_chain(info.value)  # torch.compile wraps it: BackendCompilerFailed → PassError → cause
    (i,) = [k for k, e in enumerate(chain) if isinstance(e, PassError)]
    assert type(chain[i + 1]) is cause and re.search(reason, str(chain[i + 1])), chain
    assert not any(isinstance(e, KeyError) for e in chain)


def test_dynamic_shapes_compare_symbolically():
    """Symbolic sizes: an unchanged output (a clone the pass left without meta) passes, a doubled one does not."""
    def clone_output(gm, ctx):
        _swap_output(gm, lambda v: gm.graph.call_function(aten.clone.default, (v,)))
        return PassResult(modified=True)

    def doubled_output(gm, ctx):
        _swap_output(gm, lambda v: gm.graph.call_function(aten.cat.default, ([v, v],)))
        return PassResult(modified=True)

    def f(x):
        return torch.sin(x) * 2

    for p, bad in ((clone_output, False), (doubled_output, True)):
        backend = fxpasses.Backend(extra_passes=[p], verify=False, cache=False)
        torch._dynamo.reset()
        compiled = torch.compile(f, backend=backend, dynamic=True)
        with torch.no_grad():
            for n in (3, 5, 7):  # one graph serves every size
                x = torch.randn(n, 2)
                assert torch.equal(compiled(x), f(x))
        assert backend.report.graphs == 1
        errors = backend.report.errors
        if bad:
            (record,) = errors
            assert re.search(r"output 0 \(cat\w*\) shape changed from \[(s\d+), (s\d+)\] to \[2\*\1, \2\]",
                             record.error), record.error
        else:
            assert errors == []
            (user,) = [r for r in backend.report.passes if r.name == "user/clone_output"]
            assert user.changed  # kept: the check accepted the symbolic shape as unchanged


# ---- through PassManager ---------------------------------------------------------------------------------------
def traced():
    return make_fx(model, tracing_mode="fake")(*make_inputs())


def run_manager(bad_pass, strict):
    gm = traced()
    before = [n.name for n in gm.graph.nodes]
    manager = PassManager([Stage("user", [bad_pass]), Stage("after", [lambda gm, ctx: PassResult()])])
    report = manager.run(gm, PassContext(config=PipelineConfig(verify=False, strict=strict)))
    return gm, before, report


@pytest.mark.parametrize("bad_pass, cause, reason", BROKEN + [(wrecks_the_graph, RuntimeError, "wrecked")],
                         ids=IDS + ["wrecks_the_graph"])
def test_pass_manager_rolls_back(bad_pass, cause, reason):
    gm, before, report = run_manager(bad_pass, strict=False)
    assert [n.name for n in gm.graph.nodes] == before  # the graph from before the pass, node for node
    gm.graph.lint()
    x, buf = make_inputs()
    want_out, want_buf = eager()
    assert torch.equal(gm(x, buf), want_out) and torch.equal(buf, want_buf)
    (record,) = report.errors
    assert record.name == f"user/{bad_pass.__name__}" and re.search(reason, record.error), record.error
    assert [r.name for r in report.passes][-2:] == ["after/<lambda>", "checks/invariants"]  # the pipeline went on


@pytest.mark.parametrize("bad_pass, cause, reason", BROKEN + [(wrecks_the_graph, RuntimeError, "wrecked")],
                         ids=IDS + ["wrecks_the_graph"])
def test_pass_manager_strict(bad_pass, cause, reason):
    with pytest.raises(PassError, match=bad_pass.__name__) as info:
        run_manager(bad_pass, strict=True)
    assert type(info.value.__cause__) is cause and re.search(reason, str(info.value.__cause__))


def test_input_graph_must_be_well_formed():
    gm = traced()
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    nodes[0].append(nodes[-1])  # the last computation now comes first: used before defined, no cycle
    with pytest.raises(VerificationError, match=r"<input graph>.*uses .* before it is defined"):
        PassManager([]).run(gm, PassContext(config=PipelineConfig(verify=False)))


class WithAttrs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.full((4,), 3.0))

    def forward(self, x):
        return self.lin(x) * self.scale


def deletes_attributes(gm, ctx):
    """Removes the submodule and the parameter the graph's call_module and get_attr nodes name (and returns)."""
    del gm.lin
    del gm.scale
    return PassResult(modified=True)


def deletes_attributes_and_raises(gm, ctx):
    deletes_attributes(gm, ctx)
    raise RuntimeError("gone")


@pytest.mark.parametrize("bad_pass, reason", [
    (deletes_attributes, r"call_module target 'lin' does not exist in the module"),
    (deletes_attributes_and_raises, r"RuntimeError: gone"),
])
def test_rollback_puts_back_deleted_attributes(bad_pass, reason):
    module = WithAttrs().eval()
    gm = torch.fx.symbolic_trace(module)
    assert {n.op for n in gm.graph.nodes} >= {"call_module", "get_attr"}
    report = PassManager([Stage("user", [bad_pass])]).run(gm, PassContext(config=PipelineConfig(verify=False)))
    (record,) = report.errors
    assert re.search(reason, record.error), record.error
    x = torch.randn(2, 4)
    assert gm.lin is module.lin and gm.scale is module.scale
    assert torch.equal(gm(x), module(x))
