"""The torch.compile backend: registration, reports over graph breaks, dynamic shapes, token dimension,
failing passes (strict and not), dumps."""
import importlib.metadata
import logging

import pytest
import torch
import torch.fx

import fxpasses
from pattern_helpers import compile_and_capture, double_to_add




class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, input_ids, position_ids):
        h = self.lin(torch.nn.functional.one_hot(input_ids, 8).float()) * 2
        return h + position_ids[:, None] * 2


def make_inputs(n):
    return torch.arange(n) % 8, torch.arange(n).float()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_by_name_and_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "fxpasses" and ep.value == "fxpasses.backend:fxpasses_backend" for ep in eps)
    assert "fxpasses" in torch._dynamo.list_backends()
    model = Tiny().eval()
    with torch.no_grad():
        out = torch.compile(model, backend="fxpasses")(*make_inputs(5))
        torch.testing.assert_close(out, model(*make_inputs(5)))


def test_pattern_rewrites_and_numbers():
    model = Tiny().eval()
    out, backend, before, after = compile_and_capture(model, make_inputs(6), patterns=[double_to_add])
    with torch.no_grad():
        torch.testing.assert_close(out, model(*make_inputs(6)))
    assert backend.report.matches == {"double_to_add": 2}
    assert after["aten.mul.Tensor"] == before["aten.mul.Tensor"] - 2
    assert after["aten.add.Tensor"] == before["aten.add.Tensor"] + 2
    text = str(backend.report)
    assert "patterns/double_to_add" in text and "matches: double_to_add=2" in text


def test_graph_breaks_sum_into_one_report():
    def f(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y * 2 + 1

    backend = fxpasses.Backend(patterns=[double_to_add])
    with torch.no_grad():
        out = torch.compile(f, backend=backend)(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 5.0))
    assert backend.report.graphs == 2
    assert backend.report.matches == {"double_to_add": 2}
    assert {r.graph for r in backend.report.passes} == {0, 1}


@pytest.mark.parametrize("how", ["mark_dynamic", "dynamic=True"])
def test_dynamic_shapes_compile_once(how):
    from torch._dynamo.utils import counters

    model = Tiny().eval()
    backend = fxpasses.Backend(patterns=[double_to_add])
    compiled = torch.compile(model, backend=backend, dynamic=True if how == "dynamic=True" else None)
    counters.clear()
    with torch.no_grad():
        for n in (3, 5, 17, 64, 129):
            ids, pos = make_inputs(n)
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(ids, 0)
                torch._dynamo.mark_dynamic(pos, 0)
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos))
    assert counters["stats"]["unique_graphs"] == 1
    assert backend.report.graphs == 1
    token = backend.token_dim
    assert token is not None and token.is_dynamic
    assert token.source == "L['input_ids']" and token.placeholder == "l_input_ids_"
    assert token.hint == 3
    assert token.symint_inputs == (0,) and token.input_index == 1  # Dynamo passes the SymInt first


def test_token_dim_static_and_custom_name():
    def f(tokens, scale):
        return tokens * scale

    backend = fxpasses.Backend(token_inputs=("tokens",))
    with torch.no_grad():
        torch.compile(f, backend=backend)(torch.ones(7, 2), torch.ones(2))
    token = backend.token_dim
    assert token.source == "L['tokens']" and not token.is_dynamic and int(token.expr) == 7 and token.hint == 7
    backend2 = fxpasses.Backend()
    with torch.no_grad():
        torch.compile(f, backend=backend2)(torch.ones(7, 2), torch.ones(2))
    assert backend2.token_dim is None


def broken_pass(gm, ctx):
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.target = torch.ops.aten.sub.Tensor  # half-done edit, then a crash
            break
    raise RuntimeError("this pass is broken")


def test_failing_user_pass_falls_back(caplog):
    model = Tiny().eval()
    backend = fxpasses.Backend(patterns=[double_to_add], extra_passes=[broken_pass])
    with caplog.at_level(logging.WARNING, logger="fxpasses"), torch.no_grad():
        out = torch.compile(model, backend=backend)(*make_inputs(4))
    torch.testing.assert_close(out, model(*make_inputs(4)))  # rolled back to the graph before the pass
    (record,) = backend.report.errors
    assert record.name == "user/broken_pass" and "RuntimeError: this pass is broken" in record.error
    assert backend.report.matches == {"double_to_add": 2}  # the other passes still ran
    assert "pass 'broken_pass' failed and was rolled back" in caplog.text
    assert "FAILED, rolled back: RuntimeError: this pass is broken" in str(backend.report)


def test_failing_user_pass_raises_when_strict():
    backend = fxpasses.Backend(extra_passes=[broken_pass], strict=True)
    with pytest.raises(Exception, match="broken_pass") as info, torch.no_grad():
        torch.compile(Tiny().eval(), backend=backend)(*make_inputs(4))
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, fxpasses.PassError)
    assert isinstance(inner.__cause__, RuntimeError) and str(inner.__cause__) == "this pass is broken"


def test_dump_dir_writes_readable_graphs(tmp_path):
    backend = fxpasses.Backend(patterns=[double_to_add], dump_dir=tmp_path)
    with torch.no_grad():
        torch.compile(Tiny().eval(), backend=backend)(*make_inputs(4))
    before, after = (tmp_path / "graph0_before.py").read_text(), (tmp_path / "graph0_after.py").read_text()
    assert "def forward" in before and before.count("aten.mul.Tensor") == after.count("aten.mul.Tensor") + 2


def test_bad_arguments_say_what_to_change():
    with pytest.raises(TypeError, match="mapping must be a fxpasses.Mapping, got dict"):
        fxpasses.Backend(mapping={"tp_size": 2})


def test_uuid_covers_mapping_config_patterns_and_passes():
    base = fxpasses.Backend(fxpasses.Mapping(2, 0, 2, 1), patterns=[double_to_add])
    same = fxpasses.Backend(fxpasses.Mapping(2, 0, 2, 1), patterns=[double_to_add])
    assert base.uuid() == same.uuid()
    others = [
        fxpasses.Backend(fxpasses.Mapping(2, 1, 2, 1), patterns=[double_to_add]),
        fxpasses.Backend(fxpasses.Mapping(2, 0, 1, 2), patterns=[double_to_add]),
        fxpasses.Backend(fxpasses.Mapping(2, 0, 2, 1)),
        fxpasses.Backend(fxpasses.Mapping(2, 0, 2, 1), patterns=[double_to_add], extra_passes=[broken_pass]),
        fxpasses.Backend(fxpasses.Mapping(2, 0, 2, 1), patterns=[double_to_add], verify=False),
    ]
    uuids = {b.uuid() for b in others}
    assert len(uuids) == len(others) and base.uuid() not in uuids
