"""User passes in torch's and Inductor's conventions run as extra_passes; Backend arguments are checked when it is
built, naming the argument."""
import pytest
import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_base import PassResult as TorchPassResult

import fxpasses
from fxpasses import compat
from fxpasses.testing import RecordingBackend
from fxpasses.user_passes import classify

aten = torch.ops.aten


def _mul2_to_add(graph: torch.fx.Graph) -> int:
    """``x * 2`` → ``x + x``: the same rewrite in every convention below, so each can be checked alike."""
    n = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.mul.Tensor and node.args[1] == 2:
            with graph.inserting_before(node):
                add = graph.call_function(aten.add.Tensor, (node.args[0], node.args[0]))
            add.meta.update(node.meta)
            node.replace_all_uses_with(add)
            graph.erase_node(node)
            n += 1
    return n


class TorchStylePass(PassBase):
    def call(self, graph_module):
        return TorchPassResult(graph_module, _mul2_to_add(graph_module.graph) > 0)


def torch_style_function(gm):
    return TorchPassResult(gm, _mul2_to_add(gm.graph) > 0)


def torch_style_new_module(gm):
    """torch's passes may hand back a new GraphModule; the Backend must run that one."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new = torch.fx.GraphModule(gm, graph)
    _mul2_to_add(new.graph)
    new.recompile()
    return TorchPassResult(new, True)


class InductorStylePass(compat.custom_graph_pass_base()):
    def __call__(self, graph):
        _mul2_to_add(graph)

    def uuid(self):
        return "inductor-style-mul2-v1"


def graph_annotated_function(graph: torch.fx.Graph) -> None:
    _mul2_to_add(graph)


def model(x):
    return torch.relu(x * 2) * 2


@pytest.mark.parametrize("user_pass", [TorchStylePass(), torch_style_function, torch_style_new_module,
                                       InductorStylePass(), graph_annotated_function],
                         ids=["PassBase", "gm-function", "new-module", "CustomGraphPass", "graph-function"])
def test_each_convention_runs_as_an_extra_pass(user_pass):
    torch._dynamo.reset()
    backend = RecordingBackend(extra_passes=[user_pass], patterns=[])
    x = torch.randn(5)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, model(x))
    assert backend.before["aten.mul.Tensor"] == 2
    assert backend.after["aten.mul.Tensor"] == 0 and backend.after["aten.add.Tensor"] == 2
    (record,) = [r for r in backend.report.passes if r.name.startswith("user/")]
    assert record.changed and record.error is None


def test_conventions_are_told_apart_without_calling():
    calls = []

    def ours(gm, ctx):
        calls.append("ours")

    def torch_fn(gm):
        calls.append("torch")

    assert classify(ours) == "fxpasses" and classify(torch_fn) == "torch"
    assert classify(TorchStylePass()) == "torch" and classify(InductorStylePass()) == "inductor"
    assert classify(graph_annotated_function) == "inductor"
    assert classify(lambda a, b, c: None) is None and classify(3) is None and classify(TorchStylePass) is None
    assert calls == []


def test_custom_graph_pass_uuid_enters_the_cache_key():
    class Other(InductorStylePass):
        def uuid(self):
            return "inductor-style-mul2-v2"

    a, b, c = (fxpasses.Backend(extra_passes=[p]) for p in (InductorStylePass(), InductorStylePass(), Other()))
    assert a.uuid() == b.uuid() != c.uuid()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(patterns="rms_norm"), TypeError, r"patterns must be a list, got str 'rms_norm'; write patterns=\['rms_norm'\]"),
    (dict(token_inputs="input_ids"), TypeError, "token_inputs must be a list"),
    (dict(inductor="no"), TypeError, "inductor must be True or False, got str 'no'"),
    (dict(strict=1), TypeError, "strict must be True or False"),
    (dict(extra_passes=[3]), TypeError, r"extra_passes\[0\]: 3 is not a pass"),
    (dict(extra_passes=[lambda a, b, c: None]), TypeError, r"extra_passes\[0\]: .* is not a pass"),
    (dict(extra_passes=torch_style_function), TypeError, "extra_passes must be a list"),
    (dict(dump_dir=3), TypeError, "dump_dir must be a path"),
    (dict(mapping="tp2"), TypeError, "mapping must be a fxpasses.Mapping, got str"),
    (dict(splitting_ops=["attention"]), ValueError, "splitting_ops must be a list of op names as 'namespace.name'"),
    (dict(plugins="yes"), TypeError, "plugins must be True or False"),
])
def test_bad_arguments_are_refused_when_the_backend_is_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        fxpasses.Backend(**kwargs)


def test_dump_dir_that_is_a_file_or_unwritable(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("")
    with pytest.raises(ValueError, match="dump_dir .* is a file, not a directory"):
        fxpasses.Backend(dump_dir=a_file)
    with pytest.raises(ValueError, match="dump_dir .* cannot be created"):
        fxpasses.Backend(dump_dir=a_file / "below")
