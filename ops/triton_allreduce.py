"""Fused all-reduce + add + RMSNorm over torch's symmetric memory: the CUDA kernel of ``fxp.allreduce_add_rms_norm``.

Why: at decode sizes a TP all-reduce is latency, not bandwidth. NCCL's kernel plus our ``add_rms_norm`` kernel cost
two launches and NCCL's protocol; one Triton kernel that reads the peers' rows straight through NVLink (torch's
symmetric memory maps every rank's buffer into every process) and norms them in registers costs one launch and one
small barrier (two for two-shot).

- **one-shot** (few tokens): each rank copies x into its symmetric buffer; barrier; each rank reads every peer's rows,
  sums them in rank order 0..W-1 in float32 and rounds the sum to x's dtype (at W=2 that is NCCL's number bit for
  bit, and every rank holds the same bits); then exactly what ``add_rms_norm``'s kernel does. The inputs alternate
  between two areas call by call (an epoch kept on the device), so no closing barrier is needed: the next call
  never overwrites the area a peer may still be reading.
- **two-shot** (more tokens): rank r reduces only its share of the rows and pushes the rounded sums into every
  peer's buffer; barrier; each rank then adds and norms every row (the same bits on every rank, since every rank
  holds the same sums). Each rank reads 1/W of the peers' data instead of all of it.
- **nccl**: the op's eager path (functional ``all_reduce`` then ``fxp.add_rms_norm``), everywhere else.

Barriers are per program: program b of rank r only waits for program b of each peer, through one int32 slot per
(barrier phase, program, peer) in the allocation's signal pad, used as a counting semaphore: the sender adds 1 at
system scope with release semantics and does not wait for the round trip; the receiver waits for its slot to reach
1 with acquire reads and subtracts 1. After a call on every rank the pads are back at zero. The epoch and the
semaphores live in device memory, so CUDA-graph replays keep them in step on every rank. NVLink multicast is never
used: plain loads and stores through the peers' pointers only.

Every rank must take the same path or the ranks deadlock (one waits in a barrier, another in NCCL). The choice
depends only on shapes, dtype, the group's size, this build and the environment (``FXPASSES_SYMM_ALLREDUCE``), which
are the same on every rank of an SPMD program; the workspace is made at the first eager call, which every rank
reaches in the same op sequence. Keep it so: nothing rank-local may enter :func:`choose_allreduce`.

The selection and the workspace code import without Triton (CI's CPU venv tests them); the kernels need it.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fxpasses import compat
from fxpasses.ops.library import LIB, check_float, check_norm_shapes
from fxpasses.ops.norms import all_reduce_sum

try:
    import triton
    import triton.language as tl
except ImportError:  # CI's CPU venv: the selection and gating below still import and are tested
    triton = None

log = logging.getLogger(__name__)

Path = Literal["one_shot", "two_shot", "nccl"]
ENV_SWITCH = "FXPASSES_SYMM_ALLREDUCE"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HIDDEN = 16384  # one row per program in registers, as the add_rms_norm kernel does

# Largest all-reduced payload (tokens x hidden x element size, in bytes) each fused path takes, per TP size, where it
# beat NCCL all_reduce + add_rms_norm in benchmarks/allreduce_norm.py (both in CUDA graphs). A world size that is
# not here has not been measured and keeps NCCL. H200 x2, torch 2.11 (docs/performance.md): one-shot beat NCCL + the
# norm kernel at every size measured, 1..2048 tokens x 4096 and 8192 in bf16 (1.5-2.2x), and beat two-shot at every
# size too (at W=2 both move the same bytes over each link direction; two-shot pays a second barrier), so two-shot
# is not selected at TP 2. TP 4 and 8 are unmeasured (no such machine was lent).
ONE_SHOT_MAX_BYTES: dict[int, int] = {2: 2048 * 8192 * 2}
TWO_SHOT_MAX_BYTES: dict[int, int] = {}


@dataclass(frozen=True)
class Gate:
    """What the fused kernels need besides the shapes: facts of this build, device, tensors and environment.

    Each is the same on every rank of an SPMD program (see the module docstring)."""

    enabled: bool = True  # FXPASSES_SYMM_ALLREDUCE is not "0"
    symm_mem: str | None = None  # why symmetric memory cannot serve these tensors (None: it can)
    cuda: bool = True  # x, residual and weight are CUDA tensors
    contiguous: bool = True  # x and residual are contiguous
    same_dtype: bool = True  # weight has x's dtype (the norm kernel's output dtype then equals eager's)
    nccl_group: bool = True  # the group is an NCCL group (a fake or gloo group has no GPU peers to map)


@dataclass(frozen=True)
class Choice:
    """The path one call takes, and why (for logs, the benchmark's table and tests)."""

    path: Path
    reason: str


def choose_allreduce(tokens: int, hidden: int, world_size: int, dtype: torch.dtype, gate: Gate = Gate(),
                     one_shot_max_bytes: dict[int, int] | None = None,
                     two_shot_max_bytes: dict[int, int] | None = None) -> Choice:
    """Pick one-shot, two-shot or NCCL for an all-reduce + add + RMSNorm of ``tokens`` rows of ``hidden``.

    Pure: it depends only on its arguments, which are the same on every rank, so every rank picks the same path (a
    rank-dependent choice would deadlock). The tables default to the measured ``ONE_SHOT_MAX_BYTES`` and
    ``TWO_SHOT_MAX_BYTES``.
    """
    one = ONE_SHOT_MAX_BYTES if one_shot_max_bytes is None else one_shot_max_bytes
    two = TWO_SHOT_MAX_BYTES if two_shot_max_bytes is None else two_shot_max_bytes
    if not gate.enabled:
        return Choice("nccl", f"{ENV_SWITCH}=0")
    if world_size < 2:
        return Choice("nccl", f"TP size {world_size}: nothing to reduce across ranks")
    if not gate.cuda:
        return Choice("nccl", "not CUDA tensors")
    if not gate.nccl_group:
        return Choice("nccl", "the group is not an NCCL group")
    if gate.symm_mem is not None:
        return Choice("nccl", f"no symmetric memory: {gate.symm_mem}")
    if dtype not in SUPPORTED_DTYPES:
        return Choice("nccl", f"dtype {dtype} not supported by the fused kernel")
    if not gate.same_dtype:
        return Choice("nccl", "weight dtype differs from x's")
    if not gate.contiguous:
        return Choice("nccl", "x or residual is not contiguous")
    if hidden > MAX_HIDDEN or hidden < 1:
        return Choice("nccl", f"hidden {hidden} outside 1..{MAX_HIDDEN}")
    if tokens < 1:
        return Choice("nccl", "no rows")
    nbytes = tokens * hidden * dtype.itemsize
    if world_size not in one and world_size not in two:
        return Choice("nccl", f"TP size {world_size} not measured")
    if nbytes <= one.get(world_size, 0):
        return Choice("one_shot", f"{nbytes} B <= one-shot limit {one[world_size]} B at TP {world_size}")
    if nbytes <= two.get(world_size, 0):
        return Choice("two_shot", f"{nbytes} B <= two-shot limit {two[world_size]} B at TP {world_size}")
    return Choice("nccl", f"{nbytes} B above the fused limits at TP {world_size}")


def workspace_bytes(world_size: int) -> int:
    """Symmetric bytes per (group, device): two equal areas (inputs; the two-shot's gathered sums), each as large as
    the largest payload either path is selected for, rounded up to 16 bytes."""
    area = max(ONE_SHOT_MAX_BYTES.get(world_size, 0), TWO_SHOT_MAX_BYTES.get(world_size, 0))
    return 2 * (-(-area // 16) * 16)


@functools.lru_cache(maxsize=None)
def _symm_mem_unavailable(device_type: str) -> str | None:
    return compat.symm_mem_unavailable(torch.device(device_type))


def gate_for(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, group_name: str | None = None) -> Gate:
    """The :class:`Gate` of one call's tensors in this process (and of its group, where named)."""
    return Gate(
        enabled=os.environ.get(ENV_SWITCH, "1") != "0",
        symm_mem=_symm_mem_unavailable(x.device.type),
        nccl_group=group_name is None or "nccl" in str(torch.distributed.get_backend(
            compat.resolve_process_group(group_name))).lower(),
        cuda=x.is_cuda and residual.is_cuda and weight.is_cuda,
        contiguous=x.is_contiguous() and residual.is_contiguous(),
        same_dtype=weight.dtype == x.dtype,
    )


def group_size(group_name: str) -> int:
    """The size of a process group by name (resolved on each call: a destroyed and re-made world reuses names)."""
    return compat.resolve_process_group(group_name).size()


# ---- workspace --------------------------------------------------------------------------------------------------
@dataclass
class Workspace:
    """One symmetric buffer per (process group, device), rendezvoused once, and the peer pointer tables the kernels
    read (int64 on the device, in the group's rank order)."""

    group_name: str
    device: torch.device
    buffer: torch.Tensor
    handle: Any
    buffer_ptrs: torch.Tensor
    signal_ptrs: torch.Tensor
    state: torch.Tensor  # int32 [epoch, programs arrived] (ops.triton_allreduce._arrive)
    rank: int
    world_size: int
    nbytes: int
    max_programs: int  # per launch: each barrier phase's signal-pad slots per peer, at most the device's SMs


_WORKSPACES: dict[tuple[str, int, int], Workspace] = {}
_RETIRED: list[Workspace] = []


def workspace(group_name: str, device: torch.device, min_bytes: int = 0) -> Workspace | None:
    """The group's workspace on ``device``, made at the first call outside a CUDA-graph capture.

    ``min_bytes`` (benchmarks and tests, the same on every rank) makes a larger one than the table needs, to time the
    fused paths beyond the sizes where they are selected; the previous one is retired but kept for the process's
    life (a CUDA graph captured on it keeps using its pointers, and kernel arguments keep nothing alive).

    Making it is collective (every rank of the group allocates and rendezvouses), so it happens at the first eager
    call, which every rank reaches together. Inside a capture it cannot (allocation and the store exchange are not
    capturable): that call returns None and takes the NCCL path, with a warning.
    """
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    # the default group's identity too: a destroyed and re-made world reuses group names
    key = (group_name, device.index, id(torch.distributed.group.WORLD))
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.nbytes >= min_bytes:
        return ws
    if torch.cuda.is_current_stream_capturing():
        log.warning("fxp.allreduce_add_rms_norm: first call on group %s is inside a CUDA-graph capture; the symmetric "
                    "workspace cannot be made there, so this call uses NCCL. Run one eager call first.", group_name)
        return None
    world = group_size(group_name)
    nbytes = max(workspace_bytes(world), -(-min_bytes // 32) * 32)  # two areas, each a multiple of 16 bytes
    buffer, handle = compat.symm_mem_rendezvous(nbytes, device, group_name)
    if handle.world_size != world:
        raise RuntimeError(f"fxp.allreduce_add_rms_norm: symmetric memory rendezvous over group {group_name!r} gave "
                           f"world size {handle.world_size}, but the group has {world} ranks.")
    ptrs = _buffer_pointers(buffer, handle, group_name, nbytes)
    slots = compat.symm_mem_signal_pad_bytes() // 4 // world // 2  # int32 slots per peer, for each of two phases
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ws = Workspace(
        group_name=group_name, device=device, buffer=buffer, handle=handle,
        buffer_ptrs=torch.tensor(ptrs, dtype=torch.int64, device=device),
        signal_ptrs=torch.tensor(list(handle.signal_pad_ptrs), dtype=torch.int64, device=device),
        state=torch.zeros(2, dtype=torch.int32, device=device),
        rank=handle.rank, world_size=world, nbytes=nbytes, max_programs=max(1, min(slots, sms)),
    )
    if key in _WORKSPACES:  # a CUDA graph may hold the old one's pointers (kernel arguments keep nothing alive)
        _RETIRED.append(_WORKSPACES[key])
    _WORKSPACES[key] = ws
    log.info("fxp.allreduce_add_rms_norm: symmetric workspace of %d bytes on %s for group %s (rank %d of %d)",
             nbytes, device, group_name, ws.rank, world)
    return ws


def _buffer_pointers(buffer: torch.Tensor, handle: Any, group_name: str, nbytes: int) -> list[int]:
    """Each rank's address of the workspace, in group rank order.

    ``handle.buffer_ptrs`` are the bases of the peers' allocations; where torch's symmetric memory pool placed the
    tensor inside a larger block, the tensor sits at an offset from that base. The offset is checked to be the same
    on every rank (one all-gather, once): reading a peer at another rank's offset would read the wrong memory."""
    offset = buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
    group = compat.resolve_process_group(group_name)
    mine = torch.tensor([offset], dtype=torch.int64, device=buffer.device)
    every = torch.empty(group.size(), dtype=torch.int64, device=buffer.device)
    torch.distributed.all_gather_into_tensor(every, mine, group=group)
    offsets = every.tolist()
    if len(set(offsets)) != 1 or offset < 0:
        raise RuntimeError(f"fxp.allreduce_add_rms_norm: the symmetric workspace sits at different offsets in the "
                           f"ranks' allocations ({offsets}); set {ENV_SWITCH}=0 to use NCCL.")
    size = getattr(handle, "buffer_size", None)
    if size is not None and offset + nbytes > size:
        raise RuntimeError(f"fxp.allreduce_add_rms_norm: the symmetric workspace ({nbytes} bytes at offset {offset}) "
                           f"overruns its allocation of {size} bytes; set {ENV_SWITCH}=0 to use NCCL.")
    return [base + offset for base in handle.buffer_ptrs]


def signal_pad(ws: Workspace) -> torch.Tensor:
    """This rank's signal pad as int32 (tests check it is back at zero after each call)."""
    return ws.handle.get_signal_pad(ws.rank, [compat.symm_mem_signal_pad_bytes() // 4], torch.int32)


# ---- kernels ----------------------------------------------------------------------------------------------------
if triton is not None:
    from fxpasses.ops.triton_kernels import default_warps
    from fxpasses.ops.triton_rounding import round_as

    @triton.jit
    def _barrier(SIG_PTRS, block, slots, PHASE: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr):
        """Program ``block`` of every rank meets here. The CTA barrier first, so every thread's stores (local and
        to peers) precede the release; then one thread signals each peer (adds 1 to the peer's slot for this rank,
        with release semantics at system scope; nobody reads the result, so the thread does not wait for the round
        trip), then takes each peer's signal (waits for its own slot for that peer to reach 1 with acquire reads at
        system scope, then subtracts 1), then the CTA barrier again so every thread's later loads follow it.

        The slots are counting semaphores: a signal sent before the peer took the previous one is counted, never
        lost, and every signal is taken once, so after a call on every rank the pads are back at zero (what a
        CUDA-graph replay needs). Each of a call's barriers (``PHASE`` 0 and 1) has its own slots, ``slots``
        apart."""
        tl.debug_barrier()
        base = (PHASE * slots + block) * WORLD
        for p in tl.static_range(WORLD):
            if p != RANK:
                peer_pad = tl.load(SIG_PTRS + p).to(tl.pointer_type(tl.int32))
                tl.atomic_add(peer_pad + base + RANK, 1, sem="release", scope="sys")
        local_pad = tl.load(SIG_PTRS + RANK).to(tl.pointer_type(tl.int32))
        for p in tl.static_range(WORLD):
            if p != RANK:
                while tl.atomic_add(local_pad + base + p, 0, sem="acquire", scope="sys") < 1:
                    pass
                tl.atomic_add(local_pad + base + p, -1, sem="relaxed", scope="sys")
        tl.debug_barrier()

    @triton.jit
    def _barrier_kernel(SIG_PTRS, slots, PHASE: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr):
        """One barrier per program and nothing else (tests check the signal-pad protocol with it)."""
        _barrier(SIG_PTRS, tl.program_id(0), slots, PHASE, RANK, WORLD)

    @triton.jit
    def _epoch(STATE):
        """This call's epoch: 0 or 1, the same in every program (it only changes after every program arrived)."""
        return tl.load(STATE, cache_modifier=".cg")

    @triton.jit
    def _arrive(STATE):
        """At the end of each program: the last program of the call to arrive flips the epoch (and resets the
        count) for the next call, which the kernel boundary orders after every program's read of it."""
        tl.debug_barrier()
        ticket = tl.atomic_add(STATE + 1, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            tl.atomic_xchg(STATE + 1, 0, sem="relaxed", scope="gpu")
            tl.atomic_xor(STATE, 1, sem="relaxed", scope="gpu")

    @triton.jit
    def _wide(i):
        """``i`` as int64 (row offsets of a large batch overflow int32); also works on the interpreter's ints."""
        return i + tl.zeros([], tl.int64)

    @triton.jit
    def _sum_over_ranks(BUF_PTRS, off, mask, DT: tl.constexpr, WORLD: tl.constexpr):
        """The rows at ``off`` summed over ranks 0..W-1 in float32 (starting from rank 0's value, so -0.0 stays
        -0.0), rounded to the dtype as NCCL's result is (an fp16 sum past the range becomes inf); as float32."""
        acc = tl.load(tl.multiple_of(tl.load(BUF_PTRS).to(tl.pointer_type(DT)), 16) + off, mask=mask, other=0.0,
                      cache_modifier=".cv").to(tl.float32)
        for p in tl.static_range(1, WORLD):
            buf = tl.multiple_of(tl.load(BUF_PTRS + p).to(tl.pointer_type(DT)), 16)
            acc += tl.load(buf + off, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
        return round_as(acc, DT)  # an fp16 sum past the range is inf, as in NCCL's result

    @triton.jit
    def _add_norm_store(s, R, Wt, OUT, ROUT, off, cols, mask, n_cols, eps, DT: tl.constexpr):
        """``residual_out = s + residual`` rounded as eager's add, and the RMSNorm exactly as
        ``ops.triton_kernels._norm_kernel`` computes it (same block and warps, so the same reduction tree)."""
        r = tl.load(R + off, mask=mask, other=0.0)
        xf = round_as(s + r.to(tl.float32), DT)
        tl.store(ROUT + off, xf.to(DT), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(Wt + cols, mask=mask, other=0.0)
        y = round_as(w.to(tl.float32) * round_as(xf * rstd, DT), DT)
        tl.store(OUT + off, y.to(DT), mask=mask)

    @triton.jit
    def _one_shot_kernel(X, R, Wt, OUT, ROUT, BUF_PTRS, SIG_PTRS, STATE, slots, rows, n_cols, eps, area,
                         RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
        # The inputs go to area ``epoch`` (0 or 1, alternating call by call): a peer may still be reading the other
        # area from this rank's previous call, but never the one written now. It read this area two fused calls
        # ago, and it finished that call before it signalled the barrier of the call in between, which this rank
        # waited for (each program waits for the same program of its peers, and a peer's program starts only after
        # the peer's whole previous kernel finished). So one barrier per call, no closing one.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        DT: tl.constexpr = X.dtype.element_ty
        first = _wide(_epoch(STATE)) * area
        local = tl.multiple_of(tl.load(BUF_PTRS + RANK).to(tl.pointer_type(DT)), 16) + first
        for row in range(pid, rows, nprog):
            off = _wide(row) * n_cols + cols
            tl.store(local + off, tl.load(X + off, mask=mask), mask=mask)
        if BARRIER:
            _barrier(SIG_PTRS, pid, slots, 0, RANK, WORLD)
        for row in range(pid, rows, nprog):
            off = _wide(row) * n_cols + cols
            s = _sum_over_ranks(BUF_PTRS, first + off, mask, DT, WORLD)
            _add_norm_store(s, R, Wt, OUT, ROUT, off, cols, mask, n_cols, eps, DT)
        _arrive(STATE)

    @triton.jit
    def _two_shot_kernel(X, R, Wt, OUT, ROUT, BUF_PTRS, SIG_PTRS, STATE, slots, rows, chunk, n_cols, eps, area,
                         RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
        # Rank s owns rows s*chunk .. s*chunk+chunk-1: it sums them over the ranks and pushes the rounded sums into
        # every peer's other area; then each rank adds and norms every row itself (bit-identical on every rank,
        # since every rank holds the same sums). Pushing the sums, not the normalized and residual rows, halves
        # the traffic. Program b handles in-share index j in b, b+G, ... of every share, in every phase, so each
        # phase only needs program b of each peer (the per-program barrier).
        # Inputs go to area ``epoch`` (as one-shot's, which a peer may still read from the previous call), sums to
        # the other area, which peers write only after the first barrier (so after this rank's previous call).
        # Peers read this rank's inputs before they signal the second barrier, so no read outlives the call.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        DT: tl.constexpr = X.dtype.element_ty
        epoch = _wide(_epoch(STATE))
        inputs = epoch * area
        sums = (1 - epoch) * area
        local = tl.multiple_of(tl.load(BUF_PTRS + RANK).to(tl.pointer_type(DT)), 16)
        for j in range(pid, chunk, nprog):
            for s in tl.static_range(WORLD):
                row = s * chunk + j
                off = _wide(row) * n_cols + cols
                m = mask & (row < rows)
                tl.store(local + inputs + off, tl.load(X + off, mask=m), mask=m)
        if BARRIER:
            _barrier(SIG_PTRS, pid, slots, 0, RANK, WORLD)
        for j in range(pid, chunk, nprog):
            row = RANK * chunk + j
            off = _wide(row) * n_cols + cols
            m = mask & (row < rows)
            total = _sum_over_ranks(BUF_PTRS, inputs + off, m, DT, WORLD)
            for p in tl.static_range(WORLD):
                if p != RANK:
                    peer = tl.multiple_of(tl.load(BUF_PTRS + p).to(tl.pointer_type(DT)), 16)
                    tl.store(peer + sums + off, total.to(DT), mask=m)
            _add_norm_store(total, R, Wt, OUT, ROUT, off, cols, m, n_cols, eps, DT)
        if BARRIER:
            _barrier(SIG_PTRS, pid, slots, 1, RANK, WORLD)
        for j in range(pid, chunk, nprog):
            for s in tl.static_range(WORLD):
                if s != RANK:
                    row = s * chunk + j
                    off = _wide(row) * n_cols + cols
                    m = mask & (row < rows)
                    total = tl.load(local + sums + off, mask=m, other=0.0, cache_modifier=".cv").to(tl.float32)
                    _add_norm_store(total, R, Wt, OUT, ROUT, off, cols, m, n_cols, eps, DT)
        _arrive(STATE)


@dataclass(frozen=True)
class Launch:
    """Where a fused launch reads its peers: the pointer tables, this rank, the group's size, and the programs
    it may use. A :class:`Workspace` gives one; the interpreter tests build one by hand over CPU buffers."""

    buffer_ptrs: torch.Tensor
    signal_ptrs: torch.Tensor
    state: torch.Tensor  # int32 [epoch, programs arrived], on the device; starts at zero
    rank: int
    world_size: int
    area_bytes: int  # bytes of each of the two areas
    max_programs: int
    barrier: bool = True


def launch_for(ws: Workspace) -> Launch:
    return Launch(ws.buffer_ptrs, ws.signal_ptrs, ws.state, ws.rank, ws.world_size, ws.nbytes // 2, ws.max_programs)


def fused_allreduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                 launch: Launch, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the one-shot or two-shot kernel (no selection: the caller chose; the benchmark forces a path)."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    if rows * hidden * x.element_size() > launch.area_bytes:
        raise ValueError(f"fxp.allreduce_add_rms_norm: {rows} rows x {hidden} {x.dtype} do not fit the symmetric "
                         f"workspace's {launch.area_bytes} bytes; use the NCCL path above that size.")
    out = torch.empty_like(x)
    rout = torch.empty_like(x)
    if rows == 0:
        return out, rout
    block = triton.next_power_of_2(hidden)
    warps = default_warps(hidden, rows)
    common = dict(RANK=launch.rank, WORLD=launch.world_size, BLOCK=block, BARRIER=launch.barrier, num_warps=warps)
    area = launch.area_bytes // x.element_size()
    if path == "one_shot":
        grid = (min(rows, launch.max_programs),)
        _one_shot_kernel[grid](x, residual, weight, out, rout, launch.buffer_ptrs, launch.signal_ptrs, launch.state,
                               launch.max_programs, rows, hidden, eps, area, **common)
    elif path == "two_shot":
        chunk = -(-rows // launch.world_size)
        grid = (min(chunk, launch.max_programs),)
        _two_shot_kernel[grid](x, residual, weight, out, rout, launch.buffer_ptrs, launch.signal_ptrs, launch.state,
                               launch.max_programs, rows, chunk, hidden, eps, area, **common)
    else:
        raise ValueError(f"fused_allreduce_add_rms_norm: path {path!r} must be 'one_shot' or 'two_shot'.")
    return out, rout


def allreduce_add_rms_norm_nccl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused path: NCCL's all-reduce, then ``fxp.add_rms_norm`` (its CUDA kernel)."""
    return torch.ops.fxp.add_rms_norm.default(all_reduce_sum(x, group_name), residual, weight, eps)


def select(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, group_name: str) -> Choice:
    """The path this call takes (before the workspace check)."""
    hidden = x.shape[-1] if x.dim() else 0
    tokens = x.numel() // hidden if hidden else 0
    return choose_allreduce(tokens, hidden, group_size(group_name), x.dtype, gate_for(x, residual, weight, group_name))


def allreduce_add_rms_norm_cuda(x, residual, weight, eps, group_name):
    # checks before any communication: a bad argument must not leave the other ranks waiting
    check_float("allreduce_add_rms_norm", x=x, residual=residual, weight=weight)
    check_norm_shapes("allreduce_add_rms_norm", x, weight, residual)
    choice = select(x, residual, weight, group_name)
    if choice.path != "nccl":
        ws = workspace(group_name, x.device)
        if ws is not None:
            return fused_allreduce_add_rms_norm(x, residual, weight, eps, launch_for(ws), choice.path)
    return allreduce_add_rms_norm_nccl(x, residual, weight, eps, group_name)


def register() -> None:
    LIB.impl("allreduce_add_rms_norm", allreduce_add_rms_norm_cuda, "CUDA")
