"""The example of docs/writing-a-pattern.md, run as written."""
import math

import torch

import fxpasses
from pattern_helpers import compile_and_capture
from fxpasses.patterns import Pattern


def gpt2_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


gelu_tanh = Pattern(
    name="gelu_tanh",
    benefit=10,
    spellings=lambda: [gpt2_gelu],
    input_names=("x",),
    example_inputs=lambda dtype: (torch.empty(4, 8, dtype=dtype, device="meta"),),
    replace=lambda b, x, **_: b.call(torch.ops.aten.gelu.default, x, approximate="tanh"),
    trace_dtypes=(torch.float32,),
    hint=lambda n: n.target is torch.ops.aten.tanh.default,
)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return gpt2_gelu(self.fc(x)) + torch.tanh(x)  # the second tanh is no GELU: a near miss to explain


def test_doc_example():
    model = MLP().eval()
    x = torch.randn(3, 16)
    out, backend, before, after = compile_and_capture(model, (x,), patterns=[gelu_tanh])
    assert backend.report.matches == {"gelu_tanh": 1}
    assert before["aten.tanh"] == 2 and after["aten.tanh"] == 1 and after["aten.gelu"] == 1
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    (miss,) = backend.report.near_misses
    assert miss.pattern == "gelu_tanh" and "tanh" in miss.node
    assert isinstance(fxpasses.Backend(patterns=[gelu_tanh]).patterns[0], fxpasses.pattern_pass.PatternRewritePass)
