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

import pickle
from dataclasses import dataclass
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


class PrecompileRefused(Exception):
    """A graph Dynamo's AOT save/load must not carry (fxpasses.precompile then falls back to torch.compile)."""


@dataclass(frozen=True)
class RuntimeSpec:
    """How to rebuild a serialized graph's runner in a new process (CUDA graphs are a process's own: captured
    again, lazily, on each size's first call)."""

    cuda_graph_sizes: tuple[int, ...] | None
    splitting_ops: tuple[str, ...]
    token_input: int | None  # the graph input that carries the token count (its dim 0), when one was found


class SerializedGraph(compat.serializable_callable_base()):  # type: ignore[misc]
    """Our backend's result in a form Dynamo's AOT compile can save with its bytecode and guards
    (``SerializableCallable``): the compile cache's self-contained ``GraphEntry`` plus how to rebuild the runner.

    Freshly compiled, it calls the compiled graph it was given; loaded, it is bound to a Backend
    (``Backend.adopt_serialized``: report replayed, CUDA-graph runner built with that Backend's settings), or, if
    nobody binds it, builds a runner on its first call."""

    def __init__(self, entry: Any, spec: RuntimeSpec, run: Callable[..., Any] | None = None) -> None:
        self.entry = entry  # compile_cache.GraphEntry
        self.spec = spec
        self.run = run

    @classmethod
    def serialize_compile_artifacts(cls, fn: "SerializedGraph") -> bytes:
        from fxpasses.compile_cache import FORMAT

        return pickle.dumps((FORMAT, fn.entry, fn.spec), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> "SerializedGraph":
        from fxpasses.compile_cache import FORMAT

        fmt, entry, spec = pickle.loads(data)
        if fmt != FORMAT:
            raise ValueError(f"fxpasses graph entry format {fmt}, this fxpasses reads {FORMAT}")
        return cls(entry, spec)

    def build(self, runner: Callable[[torch.fx.GraphModule], Any] | None = None) -> torch.fx.GraphModule:
        """Load the graph and make it callable; ``runner(gm)`` gives the CUDA-graph runner (or None for none)."""
        gm = compat.unpickle_graph_module(self.entry.graph)
        boxed = runner(gm) if runner is not None else None
        self.run = CachedGraph(boxed if boxed is not None else _Boxed(gm.forward),
                               self.entry.mutated_inputs, self.entry.dynamic_output_dims)
        return gm

    def __call__(self, *args: Any) -> Any:
        if self.run is None:  # loaded outside fxpasses.precompile: no Backend bound it
            from fxpasses.backend import Backend

            Backend(cache=False, cuda_graph_sizes=self.spec.cuda_graph_sizes,
                    splitting_ops=self.spec.splitting_ops, plugins=False, patterns=[]).adopt_serialized(self)
        return self.run(*args)  # type: ignore[misc]


class _Boxed:
    """AOT's boxed calling convention (one list of inputs) without importing AOT autograd: a loaded compile
    would otherwise import it (and Inductor's code cache with it, 0.2 s) for this one wrapper."""

    _boxed_call = True

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, args: list[Any]) -> Any:
        return self.fn(*args)
