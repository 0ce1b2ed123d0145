"""RMSNorm patterns: ``rms_norm``, ``add_rms_norm``, ``allreduce_add_rms_norm``.

Every family is generated from the same list of RMSNorm *spellings*: register a new spelling with
``@rms_norm_spelling`` and every norm pattern (and its fp8 variant) matches it. Each spelling is traced in float32
(where ``.float()`` is a no-op, so the casts vanish) and in bfloat16 (with the casts; the cast-back dtype is a
wildcard, so one trace serves fp16 too).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fxpasses import compat, ops
from fxpasses.patterns.matcher import EPS_SENTINEL, GROUP_SENTINEL, Match
from fxpasses.patterns.registry import MatchContext, pattern

fxp = torch.ops.fxp
aten = torch.ops.aten

_SPELLINGS: list[Callable[..., Any]] = []


def rms_norm_spelling(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn(x, weight, eps)`` as one more way to write RMSNorm."""
    _SPELLINGS.append(fn)
    return fn


def rms_norm_spellings() -> list[Callable[..., Any]]:
    return list(_SPELLINGS)


@rms_norm_spelling
def transformers_weight_first(x, weight, eps):
    """transformers' LlamaRMSNorm (and Mistral, Qwen2, ...)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


@rms_norm_spelling
def weight_last(x, weight, eps):
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(dtype) * weight


@rms_norm_spelling
def no_upcast(x, weight, eps):
    """Normalizing in the input dtype (no float32 casts)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@rms_norm_spelling
def torch_functional(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _norm_inputs(dtype: torch.dtype, *extra: str) -> tuple:
    x = torch.empty(3, 8, dtype=dtype, device="meta")
    values = {"residual": torch.empty(3, 8, dtype=dtype, device="meta"),
              "scale": torch.empty((), dtype=torch.float32, device="meta"),
              "group": GROUP_SENTINEL}
    return (x, *[values[e] for e in extra if e in ("residual",)], torch.empty(8, dtype=dtype, device="meta"),
            EPS_SENTINEL, *[values[e] for e in extra if e in ("scale", "group")])


# ---- checks (each returns the reason a structural match is rejected, or None) ------------------------------------
def _val(m: Match, name: str) -> Any:
    v = m.bindings.get(name)
    return v.meta.get("val") if isinstance(v, torch.fx.Node) else None


def check_norm(m: Match, ctx: MatchContext) -> str | None:
    x, w = _val(m, "x"), _val(m, "weight")
    if x is None or w is None:
        return "the inputs carry no shape metadata (meta['val']); run fake-tensor propagation first"
    if x.dtype not in ops.SUPPORTED_FLOAT_DTYPES:
        return (f"dtype {x.dtype} is not registered (fxp norms support "
                f"{', '.join(str(d) for d in ops.SUPPORTED_FLOAT_DTYPES)})")
    if "dtype" in m.bindings and m.bindings["dtype"] != x.dtype:
        return f"the result is cast to {m.bindings['dtype']}, not back to the input dtype {x.dtype}"
    dims = list(m.bindings.get("dims", [-1]))
    if dims not in ([-1], [x.dim() - 1]):
        return f"the mean is over dims {dims}, not the last dimension"
    weight = m.bindings["weight"]
    if weight.op not in ("placeholder", "get_attr"):
        return (f"the weight is computed ({weight.target}, node {weight.name}), not a parameter: a different norm "
                "formula (e.g. Gemma's x * (1 + w)) is not plain RMSNorm")
    if w.dim() != 1 or w.shape[0] != x.shape[-1]:
        return f"the weight has shape {tuple(w.shape)}, not ({x.shape[-1]},)"
    if w.dtype != x.dtype:
        return f"the weight is {w.dtype} but the input is {x.dtype}"
    return check_rounding(m, x.dtype)


def check_rounding(m: Match, dtype: torch.dtype) -> str | None:
    """The fused ops round where transformers' RMSNorm rounds: normalize in float32, round the normalized row to
    the input dtype, multiply by the weight in that dtype. In bf16/fp16 a spelling that rounds elsewhere computes
    other numbers (``F.rms_norm`` multiplies the weight in float32 and rounds once: about a quarter of bf16
    outputs differ in the last bit; normalizing without the upcast rounds every step), so fusing it would change
    the model's result: refused. In float32 there is nothing to round and every spelling is the same norm."""
    if dtype == torch.float32:
        return None
    weight = m.bindings["weight"]
    for node in m.graph_nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        if node.target == aten.rsqrt.default and val.dtype != torch.float32:
            return (f"this RMSNorm normalizes in {dtype} (no float32 upcast); the fused op normalizes in float32, "
                    "which would change its numbers in the last bits (and past fp16's overflow at |x| >= 256): "
                    "not fused. Upcast as transformers does (x.float() ... .to(dtype)) to have it fused")
        if weight in node.all_input_nodes and val.dtype != dtype:
            return (f"this RMSNorm multiplies the weight in {val.dtype} and rounds once (as F.rms_norm does); the "
                    f"fused op rounds the normalized row to {dtype} before the weight product (transformers' "
                    "order), which would change about a quarter of its outputs in the last bit: not fused. "
                    "Compute in float32, or write the norm as transformers does, to have it fused")
    return None


def check_residual(m: Match, ctx: MatchContext) -> str | None:
    x, r = _val(m, "x"), _val(m, "residual")
    if x is None or r is None or x.shape != r.shape or x.dtype != r.dtype:
        return (f"the residual add broadcasts or mixes dtypes ({tuple(x.shape) if x is not None else '?'} "
                f"{getattr(x, 'dtype', '?')} + {tuple(r.shape) if r is not None else '?'} {getattr(r, 'dtype', '?')})")
    return None


def check_tp_group(m: Match, ctx: MatchContext) -> str | None:
    """The collective's group must hold exactly this Mapping's TP ranks, in its order: a group is a set of ranks,
    not a name, so a DeviceMesh's group, a ``new_group`` or the default group (when TP is the whole world) all
    fuse. Names are resolved now, at compile time (under the fake process group too)."""
    group = m.bindings.get("group")
    mapping = ctx.mapping
    expected = tuple(mapping.tp_group) if mapping is not None and hasattr(mapping, "tp_group") else None
    ranks = group_ranks(group) if isinstance(group, str) else None
    if ranks is None or expected is None:  # no live group of that name: fall back to the group's name
        if ctx.tp_group_name is None:
            return (f"the all_reduce's group {group!r} is not a live process group here and this rank's TP group is "
                    "unknown (compile on the ranks that run the model, after torch.distributed is initialized)")
        if group != ctx.tp_group_name:
            return f"the all_reduce is on group {group}, not this mapping's TP group {ctx.tp_group_name}"
        return None
    if ranks == expected:
        return None
    where = (f"the all_reduce is on group {group} (ranks {list(ranks)}), not this mapping's TP group (ranks "
             f"{list(expected)}: rank {mapping.rank}, tp_size={mapping.tp_size}, pp_size={mapping.pp_size})")
    if set(ranks) == set(expected):
        return where + ("; the same ranks in another order: create the group with its ranks in ascending order "
                        "(the Mapping's TP order)")
    if hasattr(mapping, "pp_group") and ranks == tuple(mapping.pp_group) and len(ranks) > 1:
        return where + ("; that is this rank's PP group: the mesh's dimensions are swapped relative to the Mapping "
                        "(build it with Mapping.from_device_mesh(mesh, tp_dim=..., pp_dim=...))")
    return where + ("; build the Mapping from the layout the model was parallelized with "
                    "(Mapping.from_device_mesh(mesh, tp_dim=..., pp_dim=...), or Mapping(tp_size=len(group)))")


def group_ranks(group_name: str) -> tuple[int, ...] | None:
    """Global ranks of the live process group named ``group_name``, in group order; None if there is none."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        return tuple(dist.get_process_group_ranks(compat.resolve_process_group(group_name)))
    except (ValueError, RuntimeError, KeyError):
        return None


def is_rsqrt(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten.rsqrt.default


def is_all_reduce(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops._c10d_functional.all_reduce.default


def _takes_residual(target: Any) -> bool:
    """An fxp op with a ``residual`` argument: a fusion that took a residual add (add_rms_norm and its kin)."""
    schema = getattr(target, "_schema", None)
    return getattr(target, "namespace", None) == "fxp" and schema is not None and any(
        a.name == "residual" for a in schema.arguments)


def explain_all_reduce(node: torch.fx.Node) -> str | None:
    """An all_reduce whose result is never added to anything cannot be an allreduce+add+RMSNorm: say so."""
    waits = [u for u in node.users if u.op == "call_function" and u.target is torch.ops._c10d_functional.wait_tensor.default]
    if len(waits) != 1:
        return None
    readers = list(waits[0].users)
    if any(u.op == "call_function" and u.target is aten.add.Tensor for u in readers):
        return None
    if readers and all(u.op == "call_function" and _takes_residual(u.target) for u in readers):
        return None  # its only readers took the residual add into another fusion (e.g. add_rms_norm_linear)
    return (f"its result ({waits[0].name}) is not added to a residual (it is read by "
            f"{', '.join(u.name for u in readers) or 'nothing'}): allreduce_add_rms_norm fuses all_reduce, residual "
            "add and RMSNorm (a norm straight after an all_reduce fuses as rms_norm alone)")


def tp_enabled(mapping: Any, config: Any) -> bool:
    return mapping is not None and getattr(mapping, "tp_size", 1) > 1


def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group))


# ---- the patterns ----------------------------------------------------------------------------------------------


@pattern(
    name="rms_norm",
    benefit=10,
    spellings=lambda: [s for s in rms_norm_spellings()],
    input_names=("x", "weight", "eps"),
    example_inputs=lambda dtype: _norm_inputs(dtype),
    checks=(check_norm,),
    hint=is_rsqrt,
)
def rms_norm(b, x, weight, eps, **_):
    """any registered RMSNorm spelling -> fxp.rms_norm"""
    return b.call(fxp.rms_norm.default, x, weight, eps)


def _add_norm(spelling: Callable[..., Any]) -> Callable[..., Any]:
    def search(x, residual, weight, eps):
        r = x + residual
        return spelling(r, weight, eps), r

    return search


@pattern(
    name="add_rms_norm",
    benefit=20,
    spellings=lambda: [_add_norm(s) for s in rms_norm_spellings()],
    input_names=("x", "residual", "weight", "eps"),
    example_inputs=lambda dtype: _norm_inputs(dtype, "residual"),
    checks=(check_norm, check_residual),
    hint=is_rsqrt,
)
def add_rms_norm(b, x, residual, weight, eps, **_):
    """residual add whose sum feeds an RMSNorm and is also the next residual -> fxp.add_rms_norm"""
    return b.outputs(b.call(fxp.add_rms_norm.default, x, residual, weight, eps), 2)


def _allreduce_add_norm(spelling: Callable[..., Any]) -> Callable[..., Any]:
    def search(x, residual, weight, eps, group):
        r = _all_reduce(x, group) + residual
        return spelling(r, weight, eps), r

    return search


@pattern(
    name="allreduce_add_rms_norm",
    benefit=30,
    spellings=lambda: [_allreduce_add_norm(s) for s in rms_norm_spellings()],
    input_names=("x", "residual", "weight", "eps", "group"),
    example_inputs=lambda dtype: _norm_inputs(dtype, "residual", "group"),
    checks=(check_norm, check_residual, check_tp_group),
    applies=tp_enabled,
    applies_doc="mapping.tp_size > 1",
    hint=is_all_reduce,
    explain=explain_all_reduce,
)
def allreduce_add_rms_norm(b, x, residual, weight, eps, group, **_):
    """functional all_reduce on the TP group -> residual add -> RMSNorm -> fxp.allreduce_add_rms_norm"""
    return b.outputs(b.call(fxp.allreduce_add_rms_norm.default, x, residual, weight, eps, group), 2)
