"""Find the token dimension of a Dynamo graph: the placeholder that carries the token count and its SymInt.

Serving engines flatten a batch to ``input_ids [num_tokens]``; piecewise CUDA graphs are captured per token
count, so they need to know which input carries it and the symbol that stands for it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import sympy
import torch
import torch.fx

from fxpasses import compat

DEFAULT_TOKEN_INPUTS = ("input_ids", "position_ids", "positions", "inputs_embeds")


@dataclass(frozen=True)
class TokenDim:
    placeholder: str  # the placeholder's name in the Dynamo graph, e.g. "l_input_ids_"
    source: str  # Dynamo's source name, e.g. "L['input_ids']"
    input_index: int  # position among the graph's placeholders / example inputs
    expr: sympy.Expr  # the size's sympy expression (an Integer when static)
    hint: int | None  # the concrete size it was traced with
    symint_inputs: tuple[int, ...] = ()  # placeholders that are the token count itself (dynamic shapes)

    @property
    def is_dynamic(self) -> bool:
        return not self.expr.is_number


def _source(node: torch.fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        try:
            return compat.source_name(grapharg.source)
        except Exception:
            pass
    return node.name


def _input_name(source: str, placeholder: str) -> str:
    names = re.findall(r"\['([A-Za-z_][A-Za-z0-9_]*)'\]", source)
    if names:
        return names[-1]
    m = re.fullmatch(r"l_(.+)_", placeholder)
    return m.group(1) if m else placeholder


def find_token_dim(gm: torch.fx.GraphModule, names: Sequence[str] = DEFAULT_TOKEN_INPUTS) -> TokenDim | None:
    """The first placeholder named like a token input (in ``names`` order) and its first dimension."""
    candidates: dict[str, TokenDim] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        val: Any = node.meta.get("example_value", node.meta.get("val"))
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        source = _source(node)
        name = _input_name(source, node.name)
        if name not in names or name in candidates:
            continue
        size = val.shape[0]
        expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
        candidates[name] = TokenDim(node.name, source, index, expr, compat.symint_hint(size),
                                    _symint_placeholders(placeholders, expr))
    for name in names:
        if name in candidates:
            return candidates[name]
    return None


def _symint_placeholders(placeholders: list[torch.fx.Node], expr: sympy.Expr) -> tuple[int, ...]:
    if expr.is_number:
        return ()
    out = []
    for i, node in enumerate(placeholders):
        val = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(val, torch.SymInt) and val.node.expr == expr:
            out.append(i)
    return tuple(out)


def mark_token_dim(*tensors: torch.Tensor, dim: int = 0) -> None:
    """Mark the token dimension of a step's inputs so one compiled graph serves every token count, 1 included.

    ``torch._dynamo.mark_dynamic`` leaves a size of 1 specialized (Dynamo's 0/1 rule), so a 1-token decode step
    compiles a second, static graph. An *unbacked* size is never specialized: one graph, one compile, and with
    ``Backend(cuda_graph_sizes=...)`` one runner padding every count to its captured sizes. Call it on each step's
    token inputs before the compiled call (``input_ids``, ``position_ids``, ``slot_ids``, ...)."""
    for t in tensors:
        compat.mark_unbacked(t, dim)
