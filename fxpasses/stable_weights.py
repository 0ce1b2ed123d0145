"""Mark the projections whose weights no kernel of the step writes, so their GEMV may read the weight before its
programmatic-dependent-launch wait.

On CUDA the ``fxp.linear`` family's Triton kernels are launched with programmatic dependent launch (PDL,
``ops/triton_linear.pdl_enabled``): a kernel starts while the one before it drains and calls ``gdc_wait`` before
it reads anything that kernel may have written. Reading the *weight* before the wait is what hides the first
DRAM latency behind the previous kernel's tail (benchmarks/pdl_probe.py: 64 GEMVs of a 1B step in one CUDA graph,
562.5 µs waiting first, 538.7 µs with the first weight block read before the wait), but it is safe only if no
kernel that may still be running writes that weight. That is a fact about the graph, so it is proved here, per
node, and handed to the op as ``weight_stable=True``; the op never assumes it.

A node is marked when, for ``weight`` and (SwiGLU ops) ``up_weight``:

- the weight is a graph input (placeholder) or attribute (``get_attr``), through views (``effects.base_of``), not
  a value computed in the graph (a dequantized or concatenated weight is written by the kernel that makes it);
- no node of the graph writes it (``effects.written_buffers``: in-place ops, the ``copy_`` AOT keeps for an input
  mutation, and, conservatively, every input of an auto-functionalized op), matched by node for placeholders and
  by attribute name for ``get_attr``;
- the activation ``x`` is computed in the graph (not a graph input or a view of one). Why: a PDL kernel may
  overlap only the kernel launched just before it, and all kernels before that one have finished when it starts
  (each of ours triggers its dependents only after its own wait). If ``x`` comes from a kernel of this graph, the
  kernel just before ours is in this graph too, after anything the caller launched before the step (such as a
  weight update between steps), which has therefore finished.

Aliasing between two graph inputs is AOT's to make explicit: an input mutation that aliases another input is
traced through a synthetic base, whose views ``base_of`` follows. The pass runs after the patterns and the user
passes (so no later pass adds a write it did not see), in the non-Inductor pipeline only (Inductor never sees
these ops). It only sets a flag that the CPU reference ignores and that never changes a result on CUDA: the
weight's bytes are the same whenever they are read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx

from fxpasses.effects import base_of, is_hop, node_args_by_name, written_buffers, written_tensors
from fxpasses.passes import PassContext, PassResult

log = logging.getLogger("fxpasses")

FLAG = "weight_stable"


def _linear_family() -> dict[object, tuple[str, ...]]:
    """The ops that take ``weight_stable``, and the weight arguments it speaks for."""
    fxp = torch.ops.fxp
    return {
        fxp.linear.default: ("weight",),
        fxp.rms_norm_linear.default: ("weight",),
        fxp.add_rms_norm_linear.default: ("weight",),
        fxp.linear_silu_mul.default: ("weight", "up_weight"),
        fxp.add_rms_norm_linear_silu_mul.default: ("weight", "up_weight"),
    }


@dataclass(frozen=True)
class Verdict:
    """One projection node: whether its weights were proved stable, and if not, why."""

    node: str
    op: str
    stable: bool
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {'weight stable' if self.stable else 'not marked: ' + self.reason}"


def _root_key(node: object) -> object:
    """What identifies a buffer: the placeholder node, or the attribute name a ``get_attr`` reads (two get_attr
    nodes of one attribute are one buffer)."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        return ("attr", node.target)
    return node


def _writers(graph: torch.fx.Graph) -> dict[object, list[str]]:
    """For every buffer written in the graph (by its ``_root_key``), the names of the nodes that write it."""
    counts = written_buffers(graph)
    out: dict[object, list[str]] = {_root_key(b): [] for b in counts}
    if not out:
        return out
    for node in graph.nodes:
        roots = {_root_key(base_of(t)) for t in written_tensors(node)}
        if is_hop(node):
            roots |= {_root_key(base_of(a)) for a in node.all_input_nodes}
        for r in roots:
            if r in out:
                out[r].append(node.name)
    return out


def _is_input(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op in ("placeholder", "get_attr")


def judge(graph: torch.fx.Graph) -> list[Verdict]:
    """A verdict for every node of the linear family in ``graph``, in graph order (nothing is changed)."""
    family = _linear_family()
    writers: dict[object, list[str]] | None = None
    verdicts = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in family:
            continue
        if writers is None:
            writers = _writers(graph)
        args = node_args_by_name(node)
        op = str(node.target).removesuffix(".default")
        reason = ""
        for name in family[node.target]:
            w = args.get(name)
            if w is None:
                continue  # up_weight absent: the gate/up weight is one tensor
            root = base_of(w)
            label = getattr(w, "name", repr(w))
            if not _is_input(root):
                what = root.target if isinstance(root, torch.fx.Node) else type(root).__name__
                reason = (f"{name} {label} is computed in the graph (by {what}), not a graph input or attribute: "
                          "the kernel that makes it may still be running")
                break
            written = writers.get(_root_key(root))
            if written:
                reason = (f"{name} {label} is written in the graph by {', '.join(written)}: reading it before the "
                          "wait could see the old bytes")
                break
        if not reason:
            x = base_of(args.get("x"))
            if _is_input(x) or not isinstance(x, torch.fx.Node):
                reason = ("x comes straight from a graph input, so the kernel launched just before this one may be "
                          "outside the graph, where a write to the weight cannot be ruled out")
        verdicts.append(Verdict(node.name, op, not reason, reason))
    return verdicts


def mark_stable_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Set ``weight_stable`` on every linear-family node whose weights ``judge`` proved stable, and clear it on the
    others (whoever set it). Counts ``weight_stable`` (nodes marked); a note per graph says how many of how many,
    and one note per node left unmarked says why."""
    result = PassResult()
    verdicts = judge(gm.graph)
    if not verdicts:
        return result
    by_name = {v.node: v for v in verdicts}
    changed = False
    for node in gm.graph.nodes:
        v = by_name.get(node.name)
        if v is None or node.op != "call_function":
            continue
        current = bool(node_args_by_name(node).get(FLAG, False))
        if current == v.stable:
            continue
        schema_args = [a.name for a in node.target._schema.arguments]
        position = schema_args.index(FLAG)
        if len(node.args) > position:  # given positionally: rewrite it there
            args = list(node.args)
            args[position] = v.stable
            node.args = tuple(args)
        else:
            kwargs = dict(node.kwargs)
            if v.stable:
                kwargs[FLAG] = True
            else:
                kwargs.pop(FLAG, None)
            node.kwargs = kwargs
        changed = True
    marked = sum(v.stable for v in verdicts)
    if marked:
        result.count(FLAG, marked)
    result.modified = changed
    result.notes.append(f"{marked} of {len(verdicts)} linear-family nodes weight-stable (their GEMV reads the first "
                        "weight block before the PDL wait)")
    result.notes += [str(v) for v in verdicts if not v.stable]
    log.debug("stable_weights: %s", "; ".join(result.notes))
    return result


mark_stable_weights.name = "mark_stable_weights"  # type: ignore[attr-defined]


def verdicts_of(gm: torch.fx.GraphModule) -> list[Verdict]:
    """The verdicts for a graph the pipeline already ran on, read from its nodes' ``weight_stable`` arguments (for
    tests and tools: what the kernels will be told)."""
    family = _linear_family()
    return [Verdict(n.name, str(n.target).removesuffix(".default"), bool(node_args_by_name(n).get(FLAG, False)))
            for n in gm.graph.nodes if n.op == "call_function" and n.target in family]
