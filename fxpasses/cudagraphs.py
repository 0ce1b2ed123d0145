"""Piecewise CUDA graphs for the non-Inductor path.

The defunctionalized graph is split at the splitting ops (the attention op by default) with the original order
kept. Every other piece is captured into a CUDA graph once per token count in ``cuda_graph_sizes``, after one eager
warm-up at that size, all into one shared memory pool. A call pads the token dimension to the next captured size
and replays; token counts above the largest size run the unsplit graph eagerly.

The splitting ops run eagerly on the *unpadded* tokens (their token-dimension arguments are sliced back and their
output padded again), so padded tokens never reach the attention op and never write into the KV cache. Padded
inputs and the splitting ops' outputs go into static buffers (one per tensor, sized for the largest capture), so
every input of a captured piece has the same address on every call and a replay copies nothing.

*Full graphs*: with no splitting ops (``splitting_ops=()``) the whole graph is one captured piece, attention
included: the fastest decode, one replay per step. Padded tokens then run through every op, so an op that writes
state outside the token dimension (the KV cache) must say how a padded token is marked (``ops.TOKEN_PADDING``:
``fxp.attention`` skips tokens whose slot is -1 when its Triton kernel is installed), and the runner fills that
argument's padded rows with the marker. Any other such op is refused with a message naming it.

*Static graphs*: Dynamo specializes a token count of 1 (its 0/1 rule), so a 1-token decode arrives as a second
graph without a token symbol. It is captured at its one size when that size is at most the largest captured one.

*Compile-ahead*: when the runner is built, the Triton kernels its ops will launch at every captured size are
compiled in background threads (``fxpasses/compile_ahead.py``); the first call waits for them, so a cold start does
not compile them one by one as the warm-ups launch them.

Which inputs and outputs carry the token count is read from the graph's symbolic shapes: the token SymInt found
on the Dynamo graph (``fxpasses.tokens``), placeholders equal to it, and tensors whose first dimension is it.
A captured input is read in place when it is the same tensor object at warm-up and capture (weights, caches) or
one of the runner's static buffers; anything else is copied into the graph's own input before each replay.
"""
from __future__ import annotations

import bisect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from fxpasses import compat, ops
from fxpasses.compile_ahead import CompileAhead
from fxpasses.compile_ahead import enabled as compile_ahead_enabled
from fxpasses.effects import base_of, node_args_by_name, written_tensors

log = logging.getLogger("fxpasses")

DEFAULT_SPLITTING_OPS = ("fxp.attention",)


def _op_name(target: Any) -> str:
    if isinstance(target, compat.OpOverload):
        return target._schema.name.replace("::", ".")
    return str(target)


def _is_token(val: Any, token: sympy.Expr) -> bool:
    if isinstance(val, torch.SymInt):
        return val.node.expr == token
    if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt):
        return val.shape[0].node.expr == token
    return False


@dataclass
class CallState:
    """The call in flight: its captured (padded) token count and its real one."""

    size: int = 0
    tokens: int = 0


class StaticBuffers:
    """One buffer per padded tensor, sized for the largest capture, so padded tensors keep their address."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.buffers: dict[Any, torch.Tensor] = {}
        self.static_ptrs: set[int] = set()  # static buffers and captured pieces' outputs: same storage every call

    def padded(self, key: Any, t: torch.Tensor, size: int, fill: int = 0) -> torch.Tensor:
        """``t`` copied into this key's buffer, filled with ``fill`` up to ``size`` rows: a view whose address never
        changes, so captured graphs read it in place (no copies, no moved inputs)."""
        buf = self.buffers.get(key)
        if buf is None or buf.shape[1:] != t.shape[1:] or buf.dtype != t.dtype or buf.device != t.device:
            buf = self.buffers[key] = t.new_zeros((self.max_size, *t.shape[1:]))
            self.static_ptrs.add(buf.data_ptr())
        n = t.shape[0]
        buf[:n].copy_(t)
        if n < size:
            buf[n:size].fill_(fill)
        return buf[:size]


@dataclass
class CaptureEntry:
    """One size of one piece: the tensors seen at warm-up, then the captured graph and what it reads and returns."""

    seen: list[Any]  # weak references to the warm-up call's tensor arguments (None for non-tensors)
    graph: Any = None  # torch.cuda.CUDAGraph, once captured
    static: list[Any] = field(default_factory=list)  # the arguments the graph was captured with
    stable: list[int] = field(default_factory=list)  # argument indices read in place (same storage every call)
    copied: list[int] = field(default_factory=list)  # argument indices copied into ``static`` before each replay
    out: Any = None


class CapturedPiece(torch.nn.Module):
    """One piece: eager at a size's first call (warm-up), captured at its second, replayed after that.

    ``pool`` None: a runner built without a CUDA device (tests on CPU); warm-ups run, a capture is refused."""

    def __init__(self, piece: torch.fx.GraphModule, call: CallState, buffers: StaticBuffers, pool: Any,
                 warmup_only: bool = False) -> None:
        super().__init__()
        self.piece, self.call, self.buffers, self.pool, self.warmup_only = piece, call, buffers, pool, warmup_only
        self.entries: dict[int, CaptureEntry] = {}

    def forward(self, *args: Any) -> Any:
        size = self.call.size
        entry = self.entries.get(size)
        if entry is None:  # warm-up: run eagerly, remember which tensors were passed
            self.entries[size] = CaptureEntry([weakref.ref(a) if isinstance(a, torch.Tensor) else None for a in args])
            return self.piece(*args)
        if entry.graph is None:
            return self._capture(entry, args)
        for i in entry.stable:
            if args[i].data_ptr() != entry.static[i].data_ptr():
                log.warning("fxpasses: a captured input moved (argument %d); running this call eagerly", i)
                return self.piece(*args)
        for i in entry.copied:
            entry.static[i].copy_(args[i])
        entry.graph.replay()
        return entry.out

    def _capture(self, entry: CaptureEntry, args: Sequence[Any]) -> Any:
        if self.warmup_only:
            raise RuntimeError("CUDA graphs: this runner was built without a CUDA device; it runs each size's warm-up "
                               "call only.")
        for i, a in enumerate(args):
            # the same object as at warm-up (weights, caches), a static buffer or a captured piece's output: read in
            # place. A fresh tensor that happens to reuse a freed one's address is not mistaken for a stable one.
            if isinstance(a, torch.Tensor) and (entry.seen[i]() is a or a.data_ptr() in self.buffers.static_ptrs):
                entry.static.append(a)
                entry.stable.append(i)
            elif isinstance(a, torch.Tensor):
                entry.static.append(a.clone())  # fresh every call (inputs, eager attention output): copy in
                entry.copied.append(i)
            else:
                entry.static.append(a)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.piece(*entry.static)
        entry.graph, entry.out = graph, out
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.buffers.static_ptrs.add(t.data_ptr())
        graph.replay()
        return out


class EagerSplit(torch.nn.Module):
    """A splitting op's piece, run eagerly on the real tokens only."""

    def __init__(self, piece: torch.fx.GraphModule, token_args: set[int], call: CallState,
                 buffers: StaticBuffers) -> None:
        super().__init__()
        self.piece, self.token_args, self.call, self.buffers = piece, token_args, call, buffers

    def forward(self, *args: Any) -> Any:
        n = self.call.tokens
        args = [a[:n] if i in self.token_args else a for i, a in enumerate(args)]
        out = self.piece(*args)
        many = isinstance(out, (tuple, list))
        padded = [self.buffers.padded((id(self), k), o, self.call.size)
                  if isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == n else o
                  for k, o in enumerate(out if many else [out])]
        return type(out)(padded) if many else padded[0]


@dataclass(frozen=True)
class TokenLayout:
    """Which graph inputs and outputs carry the token count (by position)."""

    symint_inputs: tuple[int, ...] = ()  # SymInt inputs equal to the token count
    tensor_inputs: tuple[int, ...] = ()  # tensors whose first dimension is the token count
    token_outputs: frozenset[int] = frozenset()


def token_layout(gm: torch.fx.GraphModule, token: sympy.Expr) -> TokenLayout:
    """Read from the graph's symbolic shapes; refuses a graph where no input carries the token count."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    layout = TokenLayout(
        tuple(i for i, n in enumerate(placeholders)
              if isinstance(n.meta.get("val"), torch.SymInt) and _is_token(n.meta["val"], token)),
        tuple(i for i, n in enumerate(placeholders)
              if isinstance(n.meta.get("val"), torch.Tensor) and _is_token(n.meta["val"], token)),
        frozenset(i for i, o in enumerate(outs) if isinstance(o, torch.fx.Node) and _is_token(o.meta.get("val"), token)),
    )
    if not layout.symint_inputs and not layout.tensor_inputs:
        raise ValueError("piecewise CUDA graphs: no graph input carries the token count; pass the name of "
                         "the token input with Backend(token_inputs=...).")
    return layout


def plan_padding(gm: torch.fx.GraphModule, token: sympy.Expr, splitting: set[str]) -> dict[int, int]:
    """Check that padded tokens can run through every captured op, and find how to mark them: placeholder index
    -> the value its padded rows are filled with.

    An op that writes a tensor outside the token dimension (a KV cache) would let padded rows write it. It must be
    a splitting op (run on the real tokens only), or be listed in ``ops.TOKEN_PADDING`` with an argument that comes
    straight from a graph input, whose padded rows are then filled with the marker."""
    index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    pad_values: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or _op_name(node.target) in splitting:
            continue
        state = [w for w in written_tensors(node) if not _is_token(w.meta.get("val"), token)]
        if not state:
            continue
        marks = ops.TOKEN_PADDING.get(node.target)
        what = f"{_op_name(node.target)} (node {node.name}) writes {', '.join(w.name for w in state)} outside the token dimension"
        if marks is None:
            raise ValueError(
                f"CUDA graphs: {what}, so padded tokens would write it too. Keep it in splitting_ops (it then "
                "runs eagerly on the real tokens only), or register how it skips padded tokens in "
                "ops.TOKEN_PADDING (fxp.attention is registered there when its Triton kernel is installed).")
        args = node_args_by_name(node)
        for name, value in marks.items():
            arg = args.get(name)
            source = base_of(arg)
            if (not isinstance(source, torch.fx.Node) or source.op != "placeholder"
                    or not _is_token(arg.meta.get("val"), token) or not _is_token(source.meta.get("val"), token)):
                raise ValueError(
                    f"CUDA graphs: {what}; its padded tokens are marked through argument {name!r}, but that is "
                    f"computed in the graph ({getattr(arg, 'name', arg)}), not a graph input. Keep "
                    f"{_op_name(node.target)} in splitting_ops.")
            if pad_values.setdefault(index[source], value) != value:
                raise ValueError(f"CUDA graphs: input {source.name} needs two padding values "
                                 f"({pad_values[index[source]]} and {value}); keep {_op_name(node.target)} in "
                                 "splitting_ops.")
    return pad_values


class PiecewiseCudaGraphs:
    """A boxed callable running ``gm`` as captured pieces split at the splitting ops.

    ``token`` is the token count's sympy expression: a symbol (one graph serves every size, padded to the next
    captured one) or an integer (a static graph, captured at that size only; ``sizes`` is then ignored).
    ``warmup_only``: built without a CUDA device (tests on CPU); each size's first call runs, a capture is refused."""

    _boxed_call = True  # AOT calls it with one list of flat inputs

    def __init__(self, gm: torch.fx.GraphModule, token: sympy.Expr, sizes: Sequence[int],
                 splitting_ops: Sequence[str] = DEFAULT_SPLITTING_OPS, warmup_only: bool = False) -> None:
        self.gm = gm
        self.static_tokens = int(token) if token.is_number else None
        self.sizes = [self.static_tokens] if self.static_tokens is not None else sorted(set(int(s) for s in sizes))
        self.layout = TokenLayout() if self.static_tokens is not None else token_layout(gm, token)
        self.pad_values = {} if self.static_tokens is not None else plan_padding(gm, token, set(splitting_ops))
        self.call = CallState()
        self.buffers = StaticBuffers(self.sizes[-1])
        self.warmup_only = warmup_only
        self.pool = None if warmup_only else torch.cuda.graph_pool_handle()
        self.split, self.pieces = self._split(gm, token, set(splitting_ops))
        # our Triton kernels for every captured size, compiled in the background until the first call
        self.compile_ahead = (CompileAhead(gm, token, self.sizes)
                              if not warmup_only and compile_ahead_enabled() else None)

    def _split(self, gm: torch.fx.GraphModule, token: sympy.Expr, splitting: set[str]):
        part, assign = 0, {}
        split_nodes = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and _op_name(node.target) in splitting:
                part += 1
                assign[node] = part
                split_nodes.append(node)
                part += 1
            elif node.op not in ("placeholder", "output"):
                assign[node] = part
        split = split_module(gm, None, lambda n: assign[n], keep_original_order=True)
        split_parts = {assign[n] for n in split_nodes}
        pieces = {}
        for name, module in list(split.named_children()):
            index = int(name.rsplit("_", 1)[1])
            if index in split_parts:
                token_args = set() if self.static_tokens is not None else self._token_args(module, token)
                wrapped = EagerSplit(module, token_args, self.call, self.buffers)
            else:
                wrapped = CapturedPiece(module, self.call, self.buffers, self.pool, self.warmup_only)
            setattr(split, name, wrapped)
            pieces[name] = wrapped
        return split, pieces

    @staticmethod
    def _token_args(module: torch.fx.GraphModule, token: sympy.Expr) -> set[int]:
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        return {i for i, n in enumerate(placeholders) if _is_token(n.meta.get("val"), token)}

    def __call__(self, args: list[Any]) -> Any:
        """Boxed calling convention (AOT's): a list of flat inputs."""
        if self.compile_ahead is not None and self.compile_ahead.result is None:
            self.compile_ahead.wait()
        if self.static_tokens is not None:  # one size: nothing to pad; fresh inputs are copied into the graph's own
            self.call.size = self.call.tokens = self.static_tokens
            out = self.split(*args)
            args.clear()
            return type(out)(o.clone() if isinstance(o, torch.Tensor) else o for o in out) \
                if isinstance(out, (tuple, list)) else (out.clone() if isinstance(out, torch.Tensor) else out)
        layout = self.layout
        n = int(args[layout.symint_inputs[0]]) if layout.symint_inputs else args[layout.tensor_inputs[0]].shape[0]
        i = bisect.bisect_left(self.sizes, n)
        if i == len(self.sizes):
            return self.gm(*args)  # above the largest captured size: eager
        size = self.sizes[i]
        self.call.size, self.call.tokens = size, n
        padded = list(args)
        for j in layout.symint_inputs:
            padded[j] = size
        for j in layout.tensor_inputs:
            padded[j] = self.buffers.padded(("input", j), args[j], size, self.pad_values.get(j, 0))
        args.clear()
        out = self.split(*padded)
        outs = out if isinstance(out, (tuple, list)) else [out]
        # outputs live in the graphs' static buffers: hand the caller its own copy, sliced to the real tokens
        result = [o[:n].clone() if k in layout.token_outputs else (o.clone() if isinstance(o, torch.Tensor) else o)
                  for k, o in enumerate(outs)]
        return type(out)(result) if isinstance(out, (tuple, list)) else result[0]


def nodes_the_runner_reads(gm: torch.fx.GraphModule, splitting_ops: Sequence[str]) -> set[torch.fx.Node]:
    """The nodes whose ``meta['val']`` ``PiecewiseCudaGraphs`` reads: the graph's inputs and outputs
    (``token_layout``), what each op writes and the arguments of ops in ``ops.TOKEN_PADDING`` with their bases
    (``plan_padding``), and the inputs of splitting ops (the placeholders of the eager pieces, ``_token_args``).

    A cached graph keeps only these values (unpickling every node's fake tensor cost a loaded 16-layer model 1.9 of
    2.8 s). Whatever the runner reads must be listed here; ``tests/test_precompile.py`` checks that a runner built
    from the kept values decides as one built from the full graph."""
    splitting = set(splitting_ops)
    keep: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            keep.add(node)
        elif node.op == "output":
            keep.update(node.all_input_nodes)
        elif node.op == "call_function":
            written = written_tensors(node)
            if written or node.target in ops.TOKEN_PADDING or _op_name(node.target) in splitting:
                for arg in list(node.all_input_nodes) + list(written):
                    while isinstance(arg, torch.fx.Node):  # the argument and each view down to its base
                        keep.add(arg)
                        base = base_of(arg)
                        if base is arg:
                            break
                        arg = arg.args[0] if arg.args and isinstance(arg.args[0], torch.fx.Node) else base
    return keep
