"""Functionalization of mutating custom ops, both ways, derived from the ops' schemas.

``defunctionalize``: every ``auto_functionalized`` (v1) and ``auto_functionalized_v2`` node becomes a direct
in-place call of the op it wraps, and readers of the op's new values read the mutated buffers instead. This is
what a graph run without Inductor needs (an eager ``auto_functionalized`` clones every mutated argument) and
what keeps a send a send. Where the value from *before* the mutation is still read afterwards, mutating in place
would change what that reader sees: the node is left functional and the result says why.

``functionalize``: the reverse, for graphs that call mutating custom ops directly (``make_fx``, hand-built,
export before decompositions). Each call becomes ``auto_functionalized_v2`` and every later reader of the
mutated buffer (or of a view of it) is rewired to the new value, so patterns see one canonical form whoever
captured the graph. Writes to graph inputs get a ``copy_`` epilogue, as AOT autograd emits them.

The v2 encoding of view arguments (``_x_base_index``, ``_x_slice_dim/_start/_end``, ``_x_size/_stride/
_storage_offset``, ``_x_alias``, ``_xs_length`` and ``_xs_<i>_...`` for lists) is torch's; it lives here alone.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpasses.effects import (
    AUTO_FUNCTIONALIZED,
    AUTO_FUNCTIONALIZED_V2,
    MutableArg,
    base_of,
    can_auto_functionalize,
    is_view,
    mutable_args,
    node_args_by_name,
    written_tensors,
)
from fxpasses.cleanup import merge_duplicates
from fxpasses.passes import PassContext, PassResult

aten = torch.ops.aten


# ---- v2 view encoding ------------------------------------------------------------------------------------------
@dataclass
class ViewSpec:
    """How a mutable argument is derived from one of ``_all_bases``."""

    base_index: int
    kind: str = "base"  # base | alias | slice | as_strided
    params: tuple = ()

    def encode(self, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {f"{prefix}_base_index": self.base_index}
        if self.kind == "alias":
            out[f"{prefix}_alias"] = True
        elif self.kind == "slice":
            dim, start, end = self.params
            out.update({f"{prefix}_slice_dim": dim, f"{prefix}_slice_start": start, f"{prefix}_slice_end": end})
        elif self.kind == "as_strided":
            size, stride, offset = self.params
            out.update({f"{prefix}_size": size, f"{prefix}_stride": stride, f"{prefix}_storage_offset": offset})
        return out

    @staticmethod
    def decode(prefix: str, kwargs: dict[str, Any]) -> "ViewSpec | None":
        index = kwargs.get(f"{prefix}_base_index")
        if index is None:
            return None
        if f"{prefix}_alias" in kwargs:
            return ViewSpec(index, "alias")
        if f"{prefix}_storage_offset" in kwargs:
            return ViewSpec(index, "as_strided", (kwargs[f"{prefix}_size"], kwargs[f"{prefix}_stride"],
                                                  kwargs[f"{prefix}_storage_offset"]))
        if f"{prefix}_slice_dim" in kwargs:
            return ViewSpec(index, "slice", (kwargs[f"{prefix}_slice_dim"], kwargs[f"{prefix}_slice_start"],
                                             kwargs[f"{prefix}_slice_end"]))
        return ViewSpec(index)

    def build(self, graph: torch.fx.Graph, base: torch.fx.Node, before: torch.fx.Node | None = None,
              position: dict | None = None) -> torch.fx.Node:
        """The view node: an equivalent one that already exists before ``before``, or a new one."""
        if self.kind == "base":
            return base
        if before is not None and position is not None:
            for user in base.users:
                if position.get(user, 1 << 60) < position[before] and self.matches(user):
                    return user
        if self.kind == "alias":
            node = graph.call_function(aten.alias.default, (base,))
        elif self.kind == "slice":
            node = graph.call_function(aten.slice.Tensor, (base, *self.params))
        else:
            node = graph.call_function(aten.as_strided.default, (base, *self.params))
        _set_view_meta(node)
        return node


    def matches(self, node: torch.fx.Node) -> bool:
        """Does an existing view node compute exactly this view of its base?"""
        if node.op != "call_function" or not is_view(node):
            return False
        if self.kind == "alias":
            return node.target is aten.alias.default
        if self.kind == "slice":
            if node.target is not aten.slice.Tensor or node.kwargs:
                return False
            dim, start, end, *step = list(node.args[1:]) + [0, None, None][len(node.args) - 1:]
            return (dim, start, end) == tuple(self.params) and step in ([], [1])
        val = node.meta.get("val")
        size, stride, offset = self.params
        return (isinstance(val, torch.Tensor) and list(val.shape) == list(size)
                and list(val.stride()) == list(stride) and val.storage_offset() == offset)


def merge_duplicate_views(graph: torch.fx.Graph) -> int:
    """Replace a view op identical to an earlier one (same op, base and arguments) by the earlier one.

    Views alias their base, so two identical views are the same tensor whatever mutations come between them.
    """
    return merge_duplicates(graph, is_view)


def _set_view_meta(node: torch.fx.Node) -> None:
    base_val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if isinstance(base_val, torch.Tensor):
        try:
            with _fake_mode_of(base_val):
                node.meta["val"] = node.target(base_val, *node.args[1:])
        except Exception:  # metadata is a convenience here, never a reason to fail the rewrite
            pass


def _fake_mode_of(val: torch.Tensor) -> Any:
    import contextlib

    mode = getattr(val, "fake_mode", None)
    return mode if mode is not None else contextlib.nullcontext()


def _decode_v2(op: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Mutable-arg name -> ViewSpec, [ViewSpec | None] or None."""
    specs: dict[str, Any] = {}
    for m in mutable_args(op):
        if m.is_list:
            length = kwargs.get(f"_{m.name}_length")
            specs[m.name] = None if length is None else [ViewSpec.decode(f"_{m.name}_{i}", kwargs) for i in range(length)]
        else:
            specs[m.name] = ViewSpec.decode(f"_{m.name}", kwargs)
    return specs


# ---- helpers ---------------------------------------------------------------------------------------------------
def _getitems(node: torch.fx.Node) -> dict[int, torch.fx.Node]:
    return {u.args[1]: u for u in node.users if u.op == "call_function" and u.target is operator.getitem}


def _result_offset(op: Any) -> int:
    """auto_functionalized returns (*op_returns or (None,), *new_values)."""
    return max(len(op._schema.returns), 1)


def _aliases(base: torch.fx.Node) -> list[torch.fx.Node]:
    """``base`` and every view derived from it (transitively)."""
    out, stack = [], [base]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(u for u in n.users if is_view(u))
    return out


_SCATTER_OF = {
    aten.slice.Tensor: aten.slice_scatter.default,
    aten.select.int: aten.select_scatter.default,
    aten.as_strided.default: aten.as_strided_scatter.default,
}


def _is_scatter_back(reader: torch.fx.Node, view: torch.fx.Node, base: torch.fx.Node, new_view: torch.fx.Node) -> bool:
    """``slice_scatter(base, new_view, <view's own params>)``: after an in-place write it *is* ``base``."""
    return (
        view.target in _SCATTER_OF
        and reader.target == _SCATTER_OF[view.target]
        and view.args[0] is base
        and reader.args[0] is base
        and reader.args[1] is new_view
        and tuple(reader.args[2:]) == tuple(view.args[1:])
        and not reader.kwargs and not view.kwargs
    )


# ---- defunctionalize -------------------------------------------------------------------------------------------
def defunctionalize(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    """Turn every auto_functionalized / auto_functionalized_v2 node into a direct in-place call (see module doc)."""
    graph = gm.graph
    result = PassResult()
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (AUTO_FUNCTIONALIZED, AUTO_FUNCTIONALIZED_V2):
            continue
        op = node.args[0]
        rewrite = (_plan_v1 if node.target is AUTO_FUNCTIONALIZED else _plan_v2)(node, op, position)
        if isinstance(rewrite, str):
            result.notes.append(f"left {node.name} ({op}) functional: {rewrite}")
            continue
        _apply(graph, node, op, rewrite, position)
        result.count("defunctionalized")
    result.count("views_merged", merge_duplicate_views(graph))
    for node in list(graph.nodes):  # the copy_(x, x) that a write-back epilogue becomes
        if node.op == "call_function" and node.target is aten.copy_.default and node.args[0] is node.args[1]:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            result.count("self_copies_removed")
    return result


defunctionalize.name = "defunctionalize"  # type: ignore[attr-defined]


@dataclass
class _Rewrite:
    call_kwargs: dict[str, Any]  # kwargs of the direct call (values may be ViewSpec to build)
    new_value_for: dict[int, Any]  # getitem index -> node the new value becomes (or list for v1 lists)
    bases: list[torch.fx.Node]
    scatters: list[tuple[torch.fx.Node, torch.fx.Node]]  # (scatter node, base it collapses to)


def _later_readers(base: torch.fx.Node, hop: torch.fx.Node, position: dict, allowed: set) -> list[torch.fx.Node]:
    out = []
    for alias in _aliases(base):
        for user in alias.users:
            if user is hop or user in allowed or is_view(user) or _only_overwrites(user, alias):
                continue
            if position.get(user, -1) > position[hop]:
                out.append(user)
    return out


def _only_overwrites(user: torch.fx.Node, buffer: torch.fx.Node) -> bool:
    """``copy_(buffer, src)`` replaces buffer's contents without reading them."""
    return (user.target is aten.copy_.default and user.args[0] is buffer
            and buffer not in user.args[1:] and buffer not in user.kwargs.values())


def _plan_v1(node: torch.fx.Node, op: Any, position: dict) -> "_Rewrite | str":
    kwargs = dict(node.kwargs)
    offset = _result_offset(op)
    items = _getitems(node)
    new_value_for: dict[int, Any] = {}
    scatters: list[tuple[torch.fx.Node, torch.fx.Node]] = []
    written: list[tuple[torch.fx.Node, torch.fx.Node | None]] = []  # (arg, its new-value node)
    for j, m in enumerate(mutable_args(op)):
        value = kwargs.get(m.name)
        if value is None:
            continue
        item = items.get(offset + j)
        if m.is_list:
            new_value_for[offset + j] = list(value)
            inner = _getitems(item) if item is not None else {}
            written += [(v, inner.get(i)) for i, v in enumerate(value)]
        else:
            new_value_for[offset + j] = value
            written.append((value, item))
    for arg, new in written:
        base = base_of(arg)
        if arg is not base:
            if base_of(arg.args[0]) is not arg.args[0]:
                return f"argument {arg.name} is a view of a view; only direct views are supported in v1"
            for user in list(base.users):
                if new is not None and _is_scatter_back(user, arg, base, new):
                    scatters.append((user, base))
        allowed = {s for s, _ in scatters}
        readers = _later_readers(base, node, position, allowed)
        if readers:
            return (f"{readers[0].name} reads {base.name} (the value from before the op) after it; "
                    f"mutating in place would change what it sees")
    return _Rewrite(kwargs, new_value_for, [], scatters)


def _plan_v2(node: torch.fx.Node, op: Any, position: dict) -> "_Rewrite | str":
    kwargs = dict(node.kwargs)
    bases = list(kwargs.get("_all_bases", []))
    specs = _decode_v2(op, kwargs)
    call_kwargs = {a.name: kwargs[a.name] for a in op._schema.arguments if a.name in kwargs and a.name not in specs}
    call_kwargs.update(specs)
    for base in bases:
        readers = _later_readers(base, node, position, set())
        if readers:
            return (f"{readers[0].name} reads {base.name} (the value from before the op) after it; "
                    f"mutating in place would change what it sees")
    offset = _result_offset(op)
    return _Rewrite(call_kwargs, {offset + k: b for k, b in enumerate(bases)}, bases, [])


def _apply(graph: torch.fx.Graph, node: torch.fx.Node, op: Any, rw: _Rewrite, position: dict) -> None:
    with graph.inserting_before(node):
        kwargs: dict[str, Any] = {}
        for name, value in rw.call_kwargs.items():
            if isinstance(value, ViewSpec):
                value = value.build(graph, rw.bases[value.base_index], node, position)
            elif isinstance(value, list) and any(isinstance(v, ViewSpec) for v in value):
                value = [v.build(graph, rw.bases[v.base_index], node, position) if isinstance(v, ViewSpec) else v
                         for v in value]
            kwargs[name] = value
        kwargs = {a.name: kwargs[a.name] for a in op._schema.arguments if a.name in kwargs}  # schema order
        call = graph.call_function(op, (), kwargs)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in node.meta:
                call.meta[key] = node.meta[key]
        position[call] = position[node]
        nret = len(op._schema.returns)
        val = node.meta.get("val")
        if nret:
            call.meta["val"] = val[0] if nret == 1 and val is not None else (tuple(val[:nret]) if val else None)
    items = _getitems(node)
    for index, item in items.items():
        if index < nret:
            if nret == 1:
                replacement = call
            else:
                with graph.inserting_after(call):
                    replacement = graph.call_function(operator.getitem, (call, index))
                replacement.meta.update(item.meta)
            item.replace_all_uses_with(replacement)
        elif index in rw.new_value_for:
            target = rw.new_value_for[index]
            if isinstance(target, list):
                for sub_index, sub in _getitems(item).items():
                    sub.replace_all_uses_with(target[sub_index])
                    graph.erase_node(sub)
            else:
                item.replace_all_uses_with(target)
    for scatter, base in rw.scatters:
        scatter.replace_all_uses_with(base)
        graph.erase_node(scatter)
    for item in list(node.users):
        if not item.users:
            graph.erase_node(item)
    graph.erase_node(node)


# ---- functionalize ---------------------------------------------------------------------------------------------
def functionalize(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    """Turn direct calls of mutating custom ops into auto_functionalized_v2 and rewire later readers.

    Only for graphs whose direct writes are all custom-op calls (and a ``copy_`` write-back epilogue): readers are
    found through views, not through aten in-place ops (``buf.add_(1)`` between a view and the op). A graph with
    aten in-place writes is left as it is, with a note: ``fxpasses.canonical.canonicalize`` (what ``rewrite``
    does) functionalizes both kinds through torch's own functionalization."""
    graph = gm.graph
    result = PassResult()
    aten_write = _aten_write(graph)
    if aten_write is not None:
        result.notes.append(f"left the graph as it is: {aten_write.name} ({aten_write.target}) writes in place; "
                            "use fxpasses.canonical.canonicalize for graphs with aten in-place ops")
        return result
    position = {n: i for i, n in enumerate(graph.nodes)}
    root_input: dict[torch.fx.Node, torch.fx.Node] = {n: n for n in graph.nodes if n.op == "placeholder"}
    latest: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or not can_auto_functionalize(node.target):
            continue
        plan = _hop_arguments(node)
        if isinstance(plan, str):
            result.notes.append(f"left {node.name} ({node.target}) as a direct call: {plan}")
            continue
        hop_kwargs, bases = plan
        hop, news = _insert_hop(graph, node, hop_kwargs, bases, position)
        _rewire_returns(graph, node, hop)
        for base, new in zip(bases, news):
            _rewire_after(graph, base, new, node, position)
            root = root_input.get(base)
            if root is not None:
                root_input[new] = root
                latest[root] = new
        graph.erase_node(node)
        result.count("functionalized")
    if latest:
        _write_back_inputs(graph, latest)
        result.count("input_writebacks", len(latest))
    return result


def _hop_arguments(node: torch.fx.Node) -> tuple[dict[str, Any], list[torch.fx.Node]] | str:
    """The auto_functionalized_v2 keyword arguments and bases for a direct call, or why it cannot be made one."""
    op = node.target
    values = node_args_by_name(node)
    bases: list[torch.fx.Node] = []
    hop_kwargs: dict[str, Any] = {}
    margs = mutable_args(op)
    for m in margs:
        encoded = _encode_arg(m, values.get(m.name), bases)
        if isinstance(encoded, str):
            return encoded
        hop_kwargs.update(encoded)
    mutable_names = {m.name for m in margs}
    for a in op._schema.arguments:
        if a.name in values and a.name not in mutable_names:
            hop_kwargs[a.name] = values[a.name]
    hop_kwargs["_all_bases"] = bases
    return hop_kwargs, bases


def _insert_hop(graph: torch.fx.Graph, node: torch.fx.Node, hop_kwargs: dict[str, Any], bases: list[torch.fx.Node],
                position: dict[torch.fx.Node, int]) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """The HOP in place of ``node``, and one getitem per base: the bases' new values."""
    op = node.target
    offset = _result_offset(op)
    with graph.inserting_before(node):
        hop = graph.call_function(AUTO_FUNCTIONALIZED_V2, (op,), hop_kwargs)
        news = []
        for k, base in enumerate(bases):
            new = graph.call_function(operator.getitem, (hop, offset + k))
            if "val" in base.meta:
                new.meta["val"] = base.meta["val"]
            news.append(new)
    for n in [hop, *news]:
        position[n] = position[node]
    _set_hop_meta(hop, node, op, bases)
    return hop, news


def _rewire_returns(graph: torch.fx.Graph, node: torch.fx.Node, hop: torch.fx.Node) -> None:
    """Readers of the op's own returns read the HOP's leading outputs instead."""
    nret = len(node.target._schema.returns)
    if nret == 1:
        with graph.inserting_after(hop):
            ret = graph.call_function(operator.getitem, (hop, 0))
        ret.meta.update(node.meta)
        node.replace_all_uses_with(ret)
    elif nret > 1:
        for item in list(node.users):
            with graph.inserting_after(hop):
                ret = graph.call_function(operator.getitem, (hop, item.args[1]))
            ret.meta.update(item.meta)
            item.replace_all_uses_with(ret)
            graph.erase_node(item)


def _write_back_inputs(graph: torch.fx.Graph, latest: dict[torch.fx.Node, torch.fx.Node]) -> None:
    """Each written graph input gets its final value back, once, at the end (what AOT's epilogue does)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        for root, value in latest.items():
            graph.call_function(aten.copy_.default, (root, value))


functionalize.name = "functionalize"  # type: ignore[attr-defined]


def _aten_write(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The first direct write that is not a mutating custom op nor part of a trailing input write-back."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    tail = len(nodes)
    while tail and _is_input_writeback(nodes[tail - 1]):
        tail -= 1
    for node in nodes[:tail]:
        if written_tensors(node) and not can_auto_functionalize(node.target):
            return node
    return None


def _is_input_writeback(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is aten.copy_.default
            and isinstance(node.args[0], torch.fx.Node) and node.args[0].op in ("placeholder", "get_attr"))


def _encode_arg(m: MutableArg, value: Any, bases: list[torch.fx.Node]) -> "dict[str, Any] | str":
    if m.is_list:
        if value is None:
            return {f"_{m.name}_length": None}
        out: dict[str, Any] = {f"_{m.name}_length": len(value)}
        for i, v in enumerate(value):
            enc = _encode_one(f"_{m.name}_{i}", v, bases)
            if isinstance(enc, str):
                return enc
            out.update(enc)
        return out
    return _encode_one(f"_{m.name}", value, bases)


def _encode_one(prefix: str, value: Any, bases: list[torch.fx.Node]) -> "dict[str, Any] | str":
    if value is None:
        return {f"{prefix}_base_index": None}
    base = base_of(value)
    if base not in bases:
        bases.append(base)
    index = bases.index(base)
    if value is base:
        return ViewSpec(index).encode(prefix)
    if value.args[0] is base and value.target is aten.alias.default:
        return ViewSpec(index, "alias").encode(prefix)
    if value.args[0] is base and value.target is aten.slice.Tensor and len(value.args) <= 4 and not value.kwargs:
        dim, start, end = (list(value.args[1:]) + [0, None, None])[:3]
        return ViewSpec(index, "slice", (dim, start, end)).encode(prefix)
    val = value.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return f"argument {value.name} is a view ({value.target}) without shape metadata (meta['val'])"
    return ViewSpec(index, "as_strided", (list(val.shape), list(val.stride()), val.storage_offset())).encode(prefix)


def _set_hop_meta(hop: torch.fx.Node, node: torch.fx.Node, op: Any, bases: list[torch.fx.Node]) -> None:
    nret = len(op._schema.returns)
    val = node.meta.get("val")
    returns = (val,) if nret == 1 else (tuple(val) if nret > 1 and val is not None else (None,))
    hop.meta["val"] = (*returns, *(b.meta.get("val") for b in bases))


def _rewire_after(graph: torch.fx.Graph, base: torch.fx.Node, new: torch.fx.Node, call: torch.fx.Node,
                  position: dict) -> None:
    """Readers of ``base`` (or of views of it) after ``call`` read ``new`` (or the same views of ``new``)."""
    here = position[call]
    regenerated: dict[torch.fx.Node, torch.fx.Node] = {base: new}

    def regenerate(view: torch.fx.Node) -> torch.fx.Node:
        if view not in regenerated:
            parent = regenerate(view.args[0])
            with graph.inserting_after(parent if parent is not new else new):
                fresh = graph.call_function(view.target, (parent, *view.args[1:]), dict(view.kwargs))
            fresh.meta.update(view.meta)
            position[fresh] = here
            regenerated[view] = fresh
        return regenerated[view]

    stack = [base]
    while stack:  # base and the views of it that existed before the call
        alias = stack.pop()
        for user in list(alias.users):
            if user is call or user is new:
                continue
            if position.get(user, -1) <= here:
                if is_view(user):
                    stack.append(user)
                continue
            user.replace_input_with(alias, regenerate(alias))
