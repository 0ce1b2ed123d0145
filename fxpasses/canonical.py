"""One canonical form for every captured graph: re-traced through torch's own functionalization.

``make_fx`` and ``torch.export`` (2.13 included) keep aten in-place ops (``mul_``, ``copy_``, ``index_put_``) and
mutating custom ops as direct calls. Pattern rewrites, CSE and no-op removal reason about values, and on such a
graph a value can change under them: ``s = silu(g); g.mul_(2); s * u`` fused into ``silu_and_mul(g, u)`` reads the
written ``g``. Rather than prove, pass by pass and match by match, that nothing writes a matched input between
its first read and the insertion point, ``canonicalize`` makes the question disappear: the graph is run through
AOT autograd's Python functionalization (``FunctionalTensorMode`` under ``make_fx``), the same machinery that makes
the graphs the Backend sees. Afterwards

- every aten op is functional (views stay views; a write through a view becomes ``*_scatter`` on the base);
- every mutating custom op is ``auto_functionalized`` (v1 or v2, as ``enable_auto_functionalized_v2`` says);
- each graph input (or buffer) whose data was written gets one ``copy_`` write-back at the end, after all reads;
- an output that aliases a written input is returned as a view of that input made after its write-back, so the
  caller sees the same aliasing as eager;
- every node's ``meta['val']`` comes from one fake mode.

The calling convention is kept: the same placeholders (names, order, pytree codegen of ``ExportedProgram.module()``),
parameters and buffers as ``get_attr`` of the same targets, the same output structure. Why this and not a per-match
proof: docs/standalone-rewrite.md.

Assumption (the same as AOT autograd's when it compiles): graph inputs do not alias one another.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import map_aggregate

from fxpasses import compat
from fxpasses.cleanup import aliased_argument
from fxpasses.dependency import eliminate_dead_code
from fxpasses.effects import AUTO_FUNCTIONALIZED, AUTO_FUNCTIONALIZED_V2, is_hop, is_view, written_tensors
from fxpasses.passes import PassResult

aten = torch.ops.aten


class CanonicalizationError(RuntimeError):
    """torch's functionalization refused the graph (e.g. an input's shape or strides are changed in place)."""


@dataclass
class GraphInputs:
    """The graph's inputs as functionalization sees them: the placeholders, then each distinct tensor attribute."""

    placeholders: list[torch.fx.Node]
    attr_targets: list[list[str]] = field(default_factory=list)  # per distinct tensor: every get_attr target of it


def placeholders_of(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def check_example_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None, who: str = "rewrite") -> None:
    """``example_inputs`` must give one value per graph input (placeholder), in order."""
    if example_inputs is None:
        return
    if isinstance(example_inputs, (torch.Tensor, str)) or not isinstance(example_inputs, Sequence):
        raise TypeError(f"{who}: example_inputs must be a list or tuple with one value per graph input, got "
                        f"{type(example_inputs).__name__}.")
    names = [p.name for p in placeholders_of(gm)]
    if len(example_inputs) != len(names):
        raise ValueError(f"{who}: example_inputs has {len(example_inputs)} value(s) but the graph has {len(names)} "
                         f"input(s) ({', '.join(names) or 'none'}); pass one value per graph input, in that order "
                         "(the flat inputs, as the graph's placeholders list them).")


# ---- when a graph is already canonical -------------------------------------------------------------------------
def _is_writeback(node: torch.fx.Node) -> bool:
    """``copy_(input, new_value)``: an input's write-back (a copy of the input onto itself is no new value)."""
    return (node.op == "call_function" and node.target is aten.copy_.default and node.args[1] is not node.args[0]
            and isinstance(node.args[0], torch.fx.Node) and node.args[0].op in ("placeholder", "get_attr"))


def why_not_canonical(gm: torch.fx.GraphModule) -> str | None:
    """Why the graph needs re-tracing, or None when it is already canonical (what AOT autograd hands a backend:
    functional, mutating ops as HOPs, input writes as a ``copy_`` epilogue, metadata from one fake mode)."""
    nodes = list(gm.graph.nodes)
    epilogue = False
    for node in nodes:
        if node.op == "output":
            break
        if _is_writeback(node) and not any(u.op != "output" for u in node.users):
            epilogue = True
            continue
        if written_tensors(node):
            return f"{node.name} ({node.target}) writes in place"
        if epilogue and node.op == "call_function":
            return f"{node.name} comes after an input write-back"
    modes = set()
    for node in nodes:
        if node.op not in ("placeholder", "call_function"):
            continue
        if "val" not in node.meta:
            return f"{node.name} carries no shape metadata (meta['val'])"
        for leaf in _leaves(node.meta["val"]):
            mode = compat.fake_tensor_mode_of(leaf)
            if mode is not None:
                modes.add(id(mode))
            elif isinstance(leaf, torch.Tensor):
                return f"{node.name}'s meta['val'] is a real tensor, not a fake one"
    if len(modes) > 1:
        return f"the nodes' meta['val'] come from {len(modes)} different fake modes"
    return None


def _leaves(structure: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts, in the order ``map_aggregate`` visits them."""
    out: list[Any] = []
    map_aggregate(structure, lambda leaf: out.append(leaf) or leaf)
    return out


# ---- fake inputs -----------------------------------------------------------------------------------------------
def _is_symbolic(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return any(isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride()))
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _fake_inputs(gm: torch.fx.GraphModule, inputs: GraphInputs, example_inputs: Sequence[Any] | None,
                 attrs: list[torch.Tensor]) -> tuple[Any, list[Any]]:
    """(fake mode, one value per graph input then per tensor attribute), all from one fake mode."""
    if example_inputs is not None:
        values = list(example_inputs)
        source = "example_inputs"
    else:
        missing = [p.name for p in inputs.placeholders if "val" not in p.meta]
        if missing:
            raise ValueError(f"rewrite: the graph's inputs {missing} carry no shape metadata (meta['val']); pass "
                             f"example_inputs=[...] with one value per graph input ({len(inputs.placeholders)} in all).")
        values = [p.meta["val"] for p in inputs.placeholders]
        source = "meta['val']"
    modes = {id(m): m for v in values if (m := compat.fake_tensor_mode_of(v)) is not None}
    if len(modes) == 1:
        mode = next(iter(modes.values()))
        fakes = [v if compat.fake_tensor_mode_of(v) is not None else _to_fake(mode, v) for v in values]
    else:
        if any(_is_symbolic(v) for v in values):
            raise ValueError(f"rewrite: the graph's inputs ({source}) have symbolic shapes from {len(modes)} fake "
                             "modes; pass example_inputs=[...] (real tensors) instead.")
        mode = compat.new_fake_tensor_mode()
        fakes = [_to_fake(mode, v) for v in values]
    return mode, fakes + [_to_fake(mode, a) for a in attrs]


def _to_fake(mode: Any, value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if compat.fake_tensor_mode_of(value) is not None:  # a fake from another mode: same layout, in this one
        with mode:
            fake = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return fake.requires_grad_(value.requires_grad) if value.is_floating_point() else fake
    return mode.from_tensor(value, static_shapes=True)


def _tensor_attrs(gm: torch.fx.GraphModule) -> tuple[list[list[str]], list[torch.Tensor]]:
    """Tensor attributes the graph reads (parameters, buffers, constants), one entry per distinct tensor."""
    by_id: dict[int, int] = {}
    targets: list[list[str]] = []
    tensors: list[torch.Tensor] = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _fetch(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        k = by_id.setdefault(id(value), len(tensors))
        if k == len(tensors):
            targets.append([])
            tensors.append(value)
        if node.target not in targets[k]:
            targets[k].append(node.target)
    return targets, tensors


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


# ---- the functionalized trace ----------------------------------------------------------------------------------
class _Run(torch.fx.Interpreter):
    """Runs the captured graph on flat inputs, reading tensor attributes from the functional inputs given."""

    def __init__(self, gm: torch.fx.GraphModule, attrs: dict[str, Any]) -> None:
        super().__init__(gm, garbage_collect_values=False)  # outputs are read back from env
        self.attrs = attrs

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.attrs:
            return self.attrs[target]
        return super().get_attr(target, args, kwargs)


@dataclass
class _Trace:
    writebacks: int = 0
    regenerated_aliases: int = 0


def _functional_trace(gm: torch.fx.GraphModule, inputs: GraphInputs, fakes: list[Any], symbolic: bool,
                      info: _Trace) -> torch.fx.GraphModule:
    n_in = len(inputs.placeholders)
    out_leaves = _leaves(_output(gm).args[0])

    def program(*args: Any) -> list[Any]:
        with compat.below_functionalization():
            fargs = [compat.to_functional(a) for a in args]
            attrs = {t: fargs[n_in + k] for k, ts in enumerate(inputs.attr_targets) for t in ts}
            run = _Run(gm, attrs)
            run.run(*fargs[:n_in], enable_io_processing=False)
            leaves = [run.env[a] if isinstance(a, torch.fx.Node) else a for a in out_leaves]
            sources = [_aliased_input(leaf, fargs) for leaf in leaves]
            values = [compat.from_functional(leaf) for leaf in leaves]
            written = set()
            for k, (arg, farg) in enumerate(zip(args, fargs)):
                if not compat.is_functional(farg):
                    continue
                data, metadata = compat.functional_mutations(farg)
                if metadata:
                    raise CanonicalizationError(f"graph input {_input_name(inputs, k)} has its shape, strides or "
                                                "storage changed in place (e.g. resize_, t_, set_); only writes "
                                                "of its values are supported")
                if data:
                    arg.copy_(compat.from_functional(farg))
                    written.add(k)
                    info.writebacks += 1
            for j, k in enumerate(sources):
                if k in written:  # a view of an input written above: a view of the input after its write-back
                    values[j] = _regenerate(out_leaves[j], k, args[k], leaves[j], run.env, inputs)
                    info.regenerated_aliases += 1
            return values

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(fx_traceback.preserve_node_meta())
        stack.enter_context(compat.functionalization())
        return make_fx(program, tracing_mode="symbolic" if symbolic else "fake")(*fakes)


def _aliased_input(leaf: Any, fargs: list[Any]) -> int | None:
    if not compat.is_functional(leaf):
        return None
    return next((k for k, a in enumerate(fargs) if compat.is_functional(a) and compat.same_storage(a, leaf)), None)


def _regenerate(out: Any, k: int, base: torch.Tensor, like: torch.Tensor, env: dict, inputs: GraphInputs) -> Any:
    """The output ``out`` (a view of graph input ``k``), rebuilt on the input after its write-back: by replaying the
    captured graph's own view ops when the output reaches the input through views and in-place results only (so it
    follows the caller's strides, as eager does), else with ``as_strided`` to the traced layout."""
    chain, node = [], out
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        if is_view(node):
            chain.append(node)
        node = aliased_argument(node)
    if node is not None and _input_index(node, inputs) == k:
        value = base
        for view in reversed(chain):
            value = view.target(value, *[env[a] if isinstance(a, torch.fx.Node) else a for a in view.args[1:]],
                                **{n: env[a] if isinstance(a, torch.fx.Node) else a for n, a in view.kwargs.items()})
        if value.shape == like.shape:
            return value
    return _view_like(base, like)


def _input_index(node: torch.fx.Node, inputs: GraphInputs) -> int | None:
    if node.op == "placeholder" and node in inputs.placeholders:
        return inputs.placeholders.index(node)
    if node.op == "get_attr":
        return next((len(inputs.placeholders) + i for i, ts in enumerate(inputs.attr_targets) if node.target in ts),
                    None)
    return None


def _view_like(base: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if base.shape == like.shape and base.stride() == like.stride() and base.storage_offset() == like.storage_offset():
        return base
    return torch.as_strided(base, like.shape, like.stride(), like.storage_offset())


def _input_name(inputs: GraphInputs, k: int) -> str:
    n = len(inputs.placeholders)
    return inputs.placeholders[k].name if k < n else f"attribute {inputs.attr_targets[k - n][0]}"


# ---- putting the traced graph in place -------------------------------------------------------------------------
def _output(gm: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _install(gm: torch.fx.GraphModule, traced: torch.fx.GraphModule, inputs: GraphInputs) -> None:
    """Make ``traced`` gm's graph, with gm's placeholders (names, order), attribute targets, codegen and outputs."""
    old = gm.graph
    old_output = _output(gm).args[0]
    graph = torch.fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    n_in = len(inputs.placeholders)
    k = 0
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            if k < n_in:
                p = inputs.placeholders[k]
                new = graph.placeholder(p.name, type_expr=p.type)
                new.args = p.args  # a default value, if any
            else:
                new = graph.get_attr(inputs.attr_targets[k - n_in][0])
            k += 1
            new.meta = dict(node.meta)
        elif node.op == "get_attr":  # what make_fx lifted: constants, HOP subgraphs
            name = _free_attr_name(gm, str(node.target))
            setattr(gm, name, _fetch(traced, node.target))
            new = graph.get_attr(name)
            new.meta = dict(node.meta)
        elif node.op == "output":
            leaves = iter([env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[0]])
            graph.output(map_aggregate(old_output, lambda _: next(leaves)))
            continue
        else:
            new = graph.node_copy(node, env.__getitem__)
        env[node] = new
    _keep_input_checks(old, graph)
    # make_fx tracks an input through its write-back, so later reads name the copy_; they mean the input itself
    for node in graph.nodes:
        if _is_writeback(node):
            node.replace_all_uses_with(node.args[0])
    graph._codegen = old._codegen
    gm.graph = graph


def _keep_input_checks(old: torch.fx.Graph, graph: torch.fx.Graph) -> None:
    """Calls of submodules that only look at the inputs and return nothing (``ExportedProgram.module()``'s
    ``_guards_fn``, which checks the input shapes) ran on fake values during the trace and left no node: put them
    back, right after the placeholders, so the rewritten module still checks what it is given."""
    by_name = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    checks = [n for n in old.nodes if n.op == "call_module" and not n.users
              and all(a.op == "placeholder" and a.name in by_name for a in n.all_input_nodes)]
    if not checks:
        return
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for check in reversed(checks):
        with graph.inserting_after(last):
            new = graph.call_module(check.target, torch.fx.node.map_arg(check.args, lambda a: by_name[a.name]),
                                    torch.fx.node.map_arg(check.kwargs, lambda a: by_name[a.name]))
        new.meta.update(check.meta)


def _free_attr_name(gm: torch.nn.Module, base: str) -> str:
    name, i = base.replace(".", "_"), 0
    while hasattr(gm, name):
        i += 1
        name = f"{base.replace('.', '_')}_{i}"
    return name


# ---- the entry point -------------------------------------------------------------------------------------------
def canonicalize(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None = None,
                 force: bool = False) -> PassResult:
    """Re-trace ``gm`` in place into the canonical functional form (see the module doc); a no-op on a graph that
    already is (unless ``force``). Raises ``CanonicalizationError`` when torch's functionalization refuses the
    graph, and ``ValueError`` when input metadata is missing and no ``example_inputs`` are given; the graph is
    left untouched in both cases."""
    result = PassResult()
    check_example_inputs(gm, example_inputs)
    reason = why_not_canonical(gm)
    if reason is None and not force:
        result.notes.append("already canonical (functional, one fake mode): not re-traced")
        return result
    in_place = sum(1 for n in gm.graph.nodes if written_tensors(n))
    targets, attrs = _tensor_attrs(gm)
    inputs = GraphInputs(placeholders_of(gm), targets)
    mode, fakes = _fake_inputs(gm, inputs, example_inputs, attrs)
    symbolic = mode.shape_env is not None and any(_is_symbolic(v) for v in fakes)
    info = _Trace()
    try:
        traced = _functional_trace(gm, inputs, fakes, symbolic, info)
    except CanonicalizationError:
        raise
    except Exception as err:
        raise CanonicalizationError(f"torch's functionalization could not trace the graph: "
                                    f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    _install(gm, traced, inputs)
    eliminate_dead_code(gm)  # dead views functionalization leaves would block matches (users outside a pattern)
    gm.recompile()
    result.notes.append(f"re-traced through functionalization: {reason}")
    result.count("retraced")
    result.count("direct_writes_functionalized", in_place)
    result.count("input_writebacks", info.writebacks)
    result.count("output_aliases_regenerated", info.regenerated_aliases)
    result.count("auto_functionalized", sum(1 for n in gm.graph.nodes
                                           if is_hop(n) and n.target in (AUTO_FUNCTIONALIZED, AUTO_FUNCTIONALIZED_V2)))
    return result


canonicalize.name = "canonicalize"  # type: ignore[attr-defined]
