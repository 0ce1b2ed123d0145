"""Helpers for testing graph passes on CPU: a fake process group, real multi-rank gloo runs, graph counters.

``fake_process_group`` gives a rank its view of a world of any size inside one process (collectives do nothing
useful numerically, but graphs, group names and pattern matching are real). ``RankPool`` / ``spawn`` run a
function on several real processes talking over gloo on loopback, for numerics.
"""
from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
from multiprocessing.reduction import ForkingPickler
import os
import queue as queue_module
import socket
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.fx

from fxpasses import compat
from fxpasses.backend import Backend
from fxpasses.mapping import forget_process_groups

log = logging.getLogger(__name__)


# ---- fake process group ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int) -> Iterator[dist.ProcessGroup]:
    """Initialize torch's ``fake`` backend as ``rank`` of ``world_size``; destroy it on exit.

    Usable any number of times in one process, one at a time; it leaves no state behind (our cached groups and
    DTensor's sharding cache, which would hand a later world this one's groups, are cleared on exit).
    """
    if dist.is_initialized():
        raise RuntimeError(
            "fake_process_group: torch.distributed is already initialized in this process; "
            "leave the other process group (destroy_process_group) first."
        )
    dist.init_process_group("fake", store=compat.fake_store(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        forget_process_groups()
        compat.clear_dtensor_caches()
        dist.destroy_process_group()


# ---- real ranks over gloo --------------------------------------------------------------------------------------
class RankError(RuntimeError):
    """A rank raised; the message carries its number and its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(value: Any) -> bytes:
    # torch.save, not the queue's pickler: tensors pickled through multiprocessing go through shared-memory file
    # descriptors that die with the sending process.
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


_PROGRESS: Any = None  # in a RankPool worker: the queue progress() writes to
_RANK: int | None = None


def progress(message: str) -> None:
    """From inside a rank: tell the parent what is happening (shown by RankPool.run's on_progress); else log it."""
    if _PROGRESS is not None:
        _PROGRESS.put((_RANK, message))
    else:
        log.info("%s", message)


def _worker(rank: int, world_size: int, init_method: str, backend: str, tasks: Any, results: Any,
            progress_queue: Any) -> None:
    global _PROGRESS, _RANK
    _PROGRESS, _RANK = progress_queue, rank
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        if backend == "nccl":
            _prepare_nccl_rank(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, _dumps(fn(rank, world_size, *args))))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    forget_process_groups()
    dist.destroy_process_group()


# NVLink multicast (NVLS, multimem) can take a host's shared GPUs out of service: never on in our ranks.
NCCL_SAFE_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                         # rank 0 hosts the store and exits first; the others' NCCL heartbeat monitor then printed a
                         # traceback a second at shutdown (seen on two H200s)
                         "TORCH_NCCL_ENABLE_MONITORING": "0"}


def _prepare_nccl_rank(rank: int) -> None:
    """One GPU per rank (NCCL refuses two ranks on one device), multicast off."""
    os.environ.update(NCCL_SAFE_ENVIRONMENT)
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("RankPool(backend='nccl'): this machine has no CUDA device; use backend='gloo'.")
    torch.cuda.set_device(rank % count)


class RankPool:
    """``world_size`` processes with the default process group initialized, reused across many ``run`` calls.

    Starting a rank costs seconds (importing torch); a test module can start one pool and run many functions on
    it. Functions and their arguments travel by pickle, so they must be defined at module level. If any rank
    raises or the timeout passes, every rank is killed and the pool is closed (the others may be stuck in a
    collective waiting for the failed one).
    """

    def __init__(self, world_size: int, backend: str = "gloo", timeout: float = 120.0) -> None:
        if world_size < 1:
            raise ValueError(f"RankPool: world_size={world_size} must be at least 1.")
        if backend == "nccl" and torch.cuda.device_count() < world_size:
            raise ValueError(f"RankPool: backend='nccl' needs one GPU per rank: world_size={world_size}, but "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible.")
        self.world_size = world_size
        self.timeout = timeout
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._progress = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, init_method, backend, self._tasks[rank], self._results, self._progress),
                daemon=True,
                name=f"fxpasses-rank{rank}",
            )
            for rank in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._closed = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
            on_progress: Callable[[int, str], None] | None = None) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; return the results in rank order.

        ``on_progress(rank, message)`` receives what ranks report with :func:`progress` while they work.
        """
        if self._closed:
            raise RuntimeError("RankPool is closed (a rank failed or close() was called); start a new one.")
        _check_picklable(fn, args)
        for q in self._tasks:
            q.put((fn, args))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out: dict[int, Any] = {}
        while len(out) < self.world_size:
            self._drain_progress(on_progress)
            try:
                rank, ok, payload = self._results.get(timeout=0.5)
            except queue_module.Empty:
                self._check_alive(out, deadline)
                continue
            if not ok:
                self.kill()
                raise RankError(f"rank {rank} of {self.world_size} raised:\n{payload}")
            out[rank] = _loads(payload)
        self._drain_progress(on_progress)
        return [out[r] for r in range(self.world_size)]

    def _drain_progress(self, on_progress: Callable[[int, str], None] | None) -> None:
        while True:
            try:
                rank, message = self._progress.get_nowait()
            except queue_module.Empty:
                return
            if on_progress is not None:
                on_progress(rank, message)

    def _check_alive(self, done: dict[int, Any], deadline: float) -> None:
        dead = [r for r, p in enumerate(self._procs) if r not in done and p.exitcode is not None]
        if dead:
            self.kill()
            raise RankError(
                f"rank(s) {dead} of {self.world_size} exited (exit codes "
                f"{[self._procs[r].exitcode for r in dead]}) without returning a result."
            )
        if time.monotonic() > deadline:
            waiting = [r for r in range(self.world_size) if r not in done]
            self.kill()
            raise TimeoutError(f"ranks {waiting} of {self.world_size} did not finish in time; all ranks killed.")

    def kill(self) -> None:
        self._closed = True
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_picklable(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Tasks reach the ranks by pickle; a queue's feeder thread would swallow the error and the ranks would wait
    out the whole timeout, so pickle here first and say what to change."""
    try:
        ForkingPickler.dumps((fn, args))
    except Exception as err:
        raise TypeError(f"RankPool.run/spawn: {getattr(fn, '__qualname__', fn)!r} or its arguments cannot be pickled "
                        f"({err}); define the function at module level and pass picklable arguments.") from err


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes with the default group initialized.

    ``fn`` must be picklable (defined at module level). Returns each rank's result in rank order; raises
    :class:`RankError` with the rank's traceback if any rank raises; kills every rank after ``timeout`` seconds.
    """
    _check_picklable(fn, args)  # before any rank starts
    with RankPool(world_size, backend=backend, timeout=timeout) as pool:
        return pool.run(fn, *args)


# ---- graph helpers ---------------------------------------------------------------------------------------------
def target_name(node: torch.fx.Node) -> str:
    """A readable name for a node's target; HOPs name the op they wrap, e.g. ``auto_functionalized(fxp.pp_send)``."""
    target = node.target
    if node.op != "call_function":
        return f"{node.op}:{target}" if node.op == "call_method" else node.op
    name = _op_name(target)
    if getattr(target, "__name__", "") in ("auto_functionalized", "auto_functionalized_v2") and node.args:
        return f"{target.__name__}({_op_name(node.args[0])})"
    return name


def _op_name(target: Any) -> str:
    if isinstance(target, compat.OpOverload):
        packet = target._schema.name.replace("::", ".")
        return packet if target._overloadname == "default" else f"{packet}.{target._overloadname}"
    if isinstance(target, compat.HigherOrderOperator):
        return target.__name__
    module = getattr(target, "__module__", "") or ""
    return f"{module.split('.')[0]}.{getattr(target, '__name__', repr(target))}" if module else repr(target)


def count_ops(gm: torch.fx.GraphModule | torch.fx.Graph) -> Counter[str]:
    """How often each call target occurs, by :func:`target_name` (placeholders and outputs left out)."""
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    return Counter(target_name(n) for n in graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def op_names(gm: torch.fx.GraphModule | torch.fx.Graph) -> list[str]:
    """The graph's calls in order, by :func:`target_name`."""
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    return [target_name(n) for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]


# ---- a Backend that records what the pipeline did --------------------------------------------------------------
@dataclass
class GraphRecord:
    """One graph the pipeline ran on: its ops and code before, and after (``module`` is what runs now)."""

    index: int
    before: Counter[str]
    after: Counter[str]
    code_before: str
    code_after: str
    module: torch.fx.GraphModule


class RecordingBackend(Backend):
    """A :class:`fxpasses.Backend` that keeps each graph before and after the pipeline, in compile order.

    For tests and debugging: ``backend.records[i].before`` / ``.after`` count the ops (:func:`count_ops`), and
    ``code_before`` / ``code_after`` are the readable graphs. Everything else is the Backend's own behaviour.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[GraphRecord] = []

    def run_pipeline(self, gm: torch.fx.GraphModule, graph_index: int, fake_mode: Any = None,
                     defunctionalize: bool = True) -> torch.fx.GraphModule:
        before, code_before = count_ops(gm), gm.print_readable(print_output=False)
        out = super().run_pipeline(gm, graph_index, fake_mode, defunctionalize)
        self.records.append(GraphRecord(graph_index, before, count_ops(out), code_before,
                                        out.print_readable(print_output=False), out))
        return out

    @property
    def before(self) -> Counter[str]:
        """Ops of the first graph before the pipeline."""
        return self.records[0].before

    @property
    def after(self) -> Counter[str]:
        """Ops of the last graph after the pipeline."""
        return self.records[-1].after


def warmup_cuda_graph_backend(sizes: list[int], splitting_ops: tuple[str, ...] = ("fxp.attention",),
                              **backend_kwargs: Any) -> RecordingBackend:
    """A recording Backend with CUDA graphs at ``sizes``, usable without a CUDA device.

    Each captured size's first call is its warm-up, which runs the pieces eagerly: splitting, padding, padding
    markers and the refusals can be tested on CPU as long as each size is called once (a second call would capture,
    and raises here). ``Backend(cuda_graph_sizes=...)`` itself needs CUDA."""
    backend = RecordingBackend(**backend_kwargs)
    backend.cuda_graph_sizes, backend.splitting_ops = sorted(set(sizes)), tuple(splitting_ops)
    backend.cuda_graph_warmup_only = True
    return backend
