"""User passes in the conventions people already have, run as our ``(gm, ctx) -> PassResult`` passes.

Accepted in ``Backend(extra_passes=...)``, ``rewrite(extra_passes=...)`` and from plugins:

- ours: a callable taking ``(gm, ctx)`` and returning :class:`fxpasses.PassResult`;
- torch's infra: a ``torch.fx.passes.infra.pass_base.PassBase`` instance, or any callable taking one argument
  ``(gm)`` and returning torch's ``PassResult(graph_module, modified)`` (or None);
- Inductor's: a ``CustomGraphPass`` instance, or a one-argument callable annotated to take a ``torch.fx.Graph``:
  ``(graph) -> None``. Its ``uuid()`` enters our cache key.

Which one a callable is follows from its type and its signature, never from calling it to see: a trial call would
run a pass on a graph it was not meant for. A callable that fits none is refused when the Backend is built.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_base import PassResult as TorchPassResult

from fxpasses import compat
from fxpasses.passes import PassContext, PassResult, pass_name

Convention = Literal["fxpasses", "torch", "inductor"]


@dataclass(frozen=True)
class UserPass:
    """A user's pass, wrapped to our convention. ``original`` is what the user gave (its uuid() is used for keys)."""

    original: Any
    convention: Convention
    name: str

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.convention == "fxpasses":
            return self.original(gm, ctx)
        if self.convention == "torch":
            return _run_torch_pass(self.original, gm)
        return _run_graph_pass(self.original, gm)

    def uuid(self) -> Any:
        uuid = getattr(self.original, "uuid", None)
        return uuid() if callable(uuid) else None


def as_user_pass(p: Any, where: str = "extra_passes") -> UserPass:
    """Wrap ``p`` by its convention, or raise a TypeError that names it and says what is accepted."""
    if isinstance(p, UserPass):
        return p
    convention = classify(p)
    if convention is None:
        raise TypeError(
            f"{where}: {p!r} is not a pass. Accepted: a callable (gm, ctx) -> fxpasses.PassResult; a torch "
            "PassBase or a callable (gm) -> torch.fx.passes.infra.pass_base.PassResult; an Inductor "
            "CustomGraphPass or a callable (graph: torch.fx.Graph) -> None.")
    return UserPass(p, convention, pass_name(p))


def classify(p: Any) -> Convention | None:
    """The convention ``p`` follows, from its type and signature; None if it follows none."""
    if isinstance(p, compat.custom_graph_pass_base()):
        return "inductor"
    if isinstance(p, PassBase):
        return "torch"
    if not callable(p) or isinstance(p, type):
        return None
    params = _positional_parameters(p)
    if params is None:
        return None
    if len(params) == 2:
        return "fxpasses"
    if len(params) == 1:
        annotation = params[0].annotation
        if annotation is torch.fx.Graph or annotation in ("torch.fx.Graph", "Graph", "fx.Graph"):
            return "inductor"
        return "torch"
    return None


def _positional_parameters(p: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """The parameters a caller must fill positionally; None when the signature cannot be read or takes *args."""
    try:
        signature = inspect.signature(p)
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(q.kind is inspect.Parameter.VAR_POSITIONAL for q in signature.parameters.values()):
        return None
    return [q for q in signature.parameters.values() if q.kind in positional and q.default is inspect.Parameter.empty]


def _run_torch_pass(p: Callable[..., Any], gm: torch.fx.GraphModule) -> PassResult:
    """torch's passes may return a new GraphModule; ours edit the one they are given, so adopt its graph."""
    result = p(gm)
    if result is None:
        return PassResult(modified=True, notes=["a torch pass returned None; assumed it changed the graph"])
    if not isinstance(result, TorchPassResult):
        raise TypeError(f"torch-style pass {pass_name(p)!r} returned {type(result).__name__}, not "
                        "torch.fx.passes.infra.pass_base.PassResult")
    new = result.graph_module
    if new is not gm:
        _adopt(gm, new)
    return PassResult(modified=bool(result.modified))


def _adopt(gm: torch.fx.GraphModule, new: torch.fx.GraphModule) -> None:
    """Make ``gm`` run ``new``'s graph: move the graph over, with the attributes and submodules it reads."""
    for node in new.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            top = node.target.split(".")[0]
            if getattr(gm, top, None) is not getattr(new, top):
                setattr(gm, top, getattr(new, top))
    gm.graph = new.graph


def _run_graph_pass(p: Callable[..., Any], gm: torch.fx.GraphModule) -> PassResult:
    """Inductor's passes edit a Graph and say nothing: compare the graph's structure before and after."""
    before = _structure(gm.graph)
    p(gm.graph)
    return PassResult(modified=_structure(gm.graph) != before)


def _structure(graph: torch.fx.Graph) -> list[tuple[Any, ...]]:
    return [(n, n.op, n.target, n.args, n.kwargs) for n in graph.nodes]
