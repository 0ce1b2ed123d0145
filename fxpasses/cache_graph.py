"""Serving a cached graph without AOT autograd: which graphs may be cached, and the wrapper that runs them.

``aot_module_simplified`` returns the compiled forward inside runtime wrappers. For most graphs they do little;
for some they do real work that a cached graph would need to redo exactly: outputs that alias inputs or
intermediates (regenerated as views), input mutations applied outside the graph (metadata mutations, ``set_``),
duplicated or aliased inputs (deduplicated, or merged into synthetic bases), effect tokens, tensor subclasses,
functionalized RNG, training graphs, autocast. ``refusal`` says why a graph is one of those; such graphs are
compiled every time (the report says why). What is left for the others, ``CachedGraph`` does as AOT's wrapper
does: run the graph with grad mode off, bump the version counter of inputs the graph wrote, and mark the
outputs' dynamic dims for later compiles.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxpasses import compat


def refusal(meta: Any, graph_inputs: int, runtime_inputs: int) -> str | None:
    """Why a graph AOT compiled with this ViewAndMutationMeta cannot be served without AOT's wrappers, or None."""
    if meta is None:
        return "AOT autograd's metadata was not available"
    if graph_inputs != runtime_inputs:
        return (f"AOT changed the inputs ({runtime_inputs} given, {graph_inputs} in the graph: duplicated or "
                "aliased inputs, or parameters outside the graph)")
    checks = [
        (bool(getattr(meta, "traced_tangents", ())), "a training graph (inputs require grad)"),
        (getattr(meta, "num_outputs_aliased", 0) > 0, "an output aliases an input or an intermediate"),
        (getattr(meta, "num_mutated_inp_runtime_indices", 0) > 0, "an input mutation is applied outside the graph"),
        (getattr(meta, "num_intermediate_bases", 0) > 0, "outputs share an intermediate base"),
        (bool(getattr(meta, "tokens", None)), "the graph uses effect tokens"),
        (bool(getattr(meta, "is_rng_op_functionalized", False)), "functionalized RNG"),
        (getattr(meta, "grad_enabled_mutation", None) is not None, "the graph changes grad mode"),
        (not getattr(meta, "keep_input_mutations", True), "input mutations are not kept in the graph"),
        (not all(map(_plain, getattr(meta, "subclass_inp_meta", ()) or ())), "a tensor subclass input"),
        (not all(map(_plain, getattr(meta, "subclass_fw_graph_out_meta", ()) or ())), "a tensor subclass output"),
        (any(i.mutates_metadata or getattr(i, "mutates_storage_metadata", False) for i in meta.input_info),
         "an input's metadata is mutated"),
        (any(i.mutates_data and not getattr(i, "mutations_under_no_grad_or_inference_mode", True) and
             i.requires_grad for i in meta.input_info), "a mutated input requires grad"),
    ]
    for failed, why in checks:
        if failed:
            return why
    return None


def _plain(item: Any) -> bool:
    """An entry of AOT's subclass metadata that stands for a plain tensor or a value (an int on 2.11, a
    PlainTensorMeta on 2.13), not a tensor subclass or an opaque object."""
    return isinstance(item, int) or type(item).__name__ == "PlainTensorMeta"


def mutated_inputs(meta: Any) -> tuple[int, ...]:
    return tuple(getattr(meta, "mutated_graph_handled_indices_seen_by_autograd", ()) or ())


def dynamic_output_dims(meta: Any) -> tuple[tuple[int, tuple[int, ...]], ...]:
    return tuple((i, tuple(sorted(o.dynamic_dims))) for i, o in enumerate(meta.output_info)
                 if getattr(o, "dynamic_dims", None))


class CachedGraph:
    """A cached graph's compiled callable, called by Dynamo's bytecode with the graph's inputs.

    ``run`` takes one list of inputs (the boxed convention of ``make_boxed`` and the CUDA-graph runner)."""

    def __init__(self, run: Callable[[list[Any]], Any], mutated: tuple[int, ...],
                 dynamic_dims: tuple[tuple[int, tuple[int, ...]], ...]) -> None:
        self.run = run
        self.mutated = mutated
        self.dynamic_dims = dynamic_dims

    def __call__(self, *args: Any) -> Any:
        grad = torch.is_grad_enabled()
        if grad:  # AOT runs inference graphs with grad off
            torch.set_grad_enabled(False)
        try:
            outs = self.run(list(args))
        finally:
            if grad:
                torch.set_grad_enabled(True)
        if self.mutated:
            torch.autograd.graph.increment_version([args[i] for i in self.mutated])
        for i, dims in self.dynamic_dims:
            if isinstance(outs[i], torch.Tensor):
                compat.mark_dynamic_output_dims(outs[i], dims)
        return outs
