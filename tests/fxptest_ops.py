"""Test-only mutating custom ops whose effects can be observed in one process.

- ``emit(Tensor(a!) sink, Tensor x)``: a send stand-in; logs a copy of x (side-effecting) and bumps sink.
- ``fill_next(Tensor(a!) buf)``: a receive stand-in; fills buf with the next number of a counter.
- ``scale_(Tensor(a!) x, float s) -> Tensor``: mutates x and returns a fresh tensor (an op with a return).
- ``accumulate(Tensor(a!)[] xs, Tensor y)``: mutates every tensor of a list.
"""
import torch
import torch.fx

LOG: list[torch.Tensor] = []
COUNTER = [0]

lib = torch.library.Library("fxptest", "DEF")
lib.define("emit(Tensor(a!) sink, Tensor x) -> ()")
lib.define("fill_next(Tensor(a!) buf) -> ()")
lib.define("scale_(Tensor(a!) x, float s) -> Tensor")
lib.define("accumulate(Tensor(a!)[] xs, Tensor y) -> ()")


def _emit(sink, x):
    LOG.append(x.detach().clone())
    sink.add_(1)


def _fill_next(buf):
    buf.fill_(float(COUNTER[0]))
    COUNTER[0] += 1


def _scale_(x, s):
    x.mul_(s)
    return x.sum(-1)


def _accumulate(xs, y):
    for x in xs:
        x.add_(y)


for name, fn in [("emit", _emit), ("fill_next", _fill_next), ("scale_", _scale_), ("accumulate", _accumulate)]:
    lib.impl(name, fn, "CompositeExplicitAutograd")
torch.library.register_fake("fxptest::emit", lambda sink, x: None, lib=lib)
torch.library.register_fake("fxptest::fill_next", lambda buf: None, lib=lib)
torch.library.register_fake("fxptest::scale_", lambda x, s: x.sum(-1), lib=lib)
torch.library.register_fake("fxptest::accumulate", lambda xs, y: None, lib=lib)
torch.fx.node.has_side_effect(torch.ops.fxptest.emit.default)
torch.fx.node.has_side_effect(torch.ops.fxptest.fill_next.default)


def reset() -> None:
    LOG.clear()
    COUNTER[0] = 0
