"""Importing this module registers the pattern (fxpasses loads it through the ``fxpasses.patterns`` entry point)."""
import math

import torch

from fxpasses import patterns


def gpt2_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


@patterns.pattern(name="example_gelu_tanh", benefit=10, spellings=lambda: [gpt2_gelu], input_names=("x",),
                  example_inputs=lambda dtype: (torch.empty(4, 8, dtype=dtype, device="meta"),),
                  trace_dtypes=(torch.float32,))
def example_gelu_tanh(b, x, **_):
    """GPT-2's hand-written GELU -> aten.gelu(approximate="tanh")"""
    return b.call(torch.ops.aten.gelu.default, x, approximate="tanh")
