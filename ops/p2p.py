"""Pipeline-parallel point-to-point ops: ``pp_send``, ``pp_recv`` and their list forms.

They are declared as *mutating* their buffer (``Tensor(a!)``) on purpose: a functional op with no outputs that
anyone reads is dead code to every compiler, while a mutation of a live buffer is not. They are also registered
as side-effecting, because AOT autograd still deletes a functionalized send whose buffer is never read again
(field notes). ``peer`` is a global rank; ``group_name`` names the process group (``ProcessGroup.group_name``),
the same convention torch's functional collectives use. Under the fake process group they do nothing.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from fxpasses import compat
from fxpasses.ops.library import check_same_device, define_op


def _group(op: str, peer: int, group_name: str) -> dist.ProcessGroup:
    if not dist.is_initialized():
        raise RuntimeError(f"fxp.{op}: torch.distributed is not initialized; call init_process_group first.")
    try:
        group = compat.resolve_process_group(group_name)
    except Exception as err:  # torch raises different types across versions
        raise ValueError(f"fxp.{op}: no process group is named {group_name!r}.") from err
    ranks = dist.get_process_group_ranks(group)
    if peer not in ranks:
        raise ValueError(f"fxp.{op}: peer {peer} is not in group {group_name!r}, whose global ranks are {ranks}.")
    if peer == dist.get_rank():
        raise ValueError(f"fxp.{op}: peer {peer} is this rank itself; a pipeline peer is another stage's rank.")
    return group


def _check_devices(op: str, tensors: Sequence[torch.Tensor]) -> None:
    """A list with tensors on several devices dispatches by the 'highest' one (a meta tensor among CPU ones sends
    nothing at all), so one device for the whole list."""
    if len(tensors) > 1:
        check_same_device(op, **{f"tensors[{i}]": t for i, t in enumerate(tensors)})


def _check_buffers(op: str, tensors: Sequence[torch.Tensor]) -> None:
    _check_devices(op, tensors)
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(
                f"fxp.{op}: buffer {i} (shape {tuple(t.shape)}, stride {t.stride()}) is not contiguous; "
                "send and receive contiguous tensors (call .contiguous() first)."
            )


def send_all(op: str, tensors: Sequence[torch.Tensor], peer: int, group_name: str) -> None:
    _check_buffers(op, tensors)
    group = _group(op, peer, group_name)
    for t in tensors:
        dist.send(t, dst=peer, group=group)


def recv_all(op: str, tensors: Sequence[torch.Tensor], peer: int, group_name: str) -> None:
    _check_buffers(op, tensors)
    group = _group(op, peer, group_name)
    for t in tensors:
        dist.recv(t, src=peer, group=group)


def _nothing(*args, **kwargs) -> None:
    return None


def _fake_list(op: str):
    def fake(tensors, peer, group_name) -> None:
        _check_devices(op, tensors)  # so tracing fails too, and a CPU + meta list cannot silently send nothing

    return fake


pp_send = define_op(
    "pp_send(Tensor(a!) tensor, int peer, str group_name) -> ()",
    lambda tensor, peer, group_name: send_all("pp_send", [tensor], peer, group_name),
    _nothing,
    side_effect=True,
)
pp_recv = define_op(
    "pp_recv(Tensor(a!) tensor, int peer, str group_name) -> ()",
    lambda tensor, peer, group_name: recv_all("pp_recv", [tensor], peer, group_name),
    _nothing,
    side_effect=True,
)
pp_send_tensors = define_op(
    "pp_send_tensors(Tensor(a!)[] tensors, int peer, str group_name) -> ()",
    lambda tensors, peer, group_name: send_all("pp_send_tensors", tensors, peer, group_name),
    _fake_list("pp_send_tensors"),
    side_effect=True,
)
pp_recv_tensors = define_op(
    "pp_recv_tensors(Tensor(a!)[] tensors, int peer, str group_name) -> ()",
    lambda tensors, peer, group_name: recv_all("pp_recv_tensors", tensors, peer, group_name),
    _fake_list("pp_recv_tensors"),
    side_effect=True,
)
