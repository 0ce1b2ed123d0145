"""Compile the Triton kernels a CUDA-graph runner will launch before its first call needs them, in parallel.

Why: a cold start compiled our kernels one at a time, as the first eager call at each captured size launched them.
On an H200 (torch 2.11, Triton 3.6), a 1B Llama captured at 1 and 32 tokens compiled 13 kernels: 4.5 s of Triton
compiles plus 2.7 s building their C launchers with gcc, more than a third of the cold start.

Which kernel and specialization one of our ops launches depends on its arguments' shapes, strides, dtypes and
alignment, never on their values (the ops are capture-safe: they never read the device from the host), and the
graph's fake tensors give all of that for every captured size once the token symbol is bound. So each distinct
call of an ``fxp`` op with a CUDA kernel is *rehearsed* once per size on zero-filled scratch tensors of that layout,
with Triton's ``jit_cache_hook`` recording each specialization the call would compile and skipping the compile and
the launch. Then Triton's own ``preload`` compiles the recorded specializations, and their launchers are built, in
a small thread pool (ptxas and gcc are subprocesses and Triton's C++ passes run outside the GIL: 4 threads measured
2.2x faster than one), while the compile of the rest of the model goes on. The runner waits for them before its
first call.

Never a different result:

- the rehearsal reads and writes only its own scratch tensors. A specialization that is already compiled is
  launched for real, on zeros (indices 0: in bounds), into scratch;
- what is compiled is exactly what a launch would compile (the recorded specialization), so a launch finds it in
  Triton's caches, or compiles it itself as before if anything here failed;
- ops with side effects or communication (``ops.SIDE_EFFECT_OPS``, anything with a process group: sends,
  receives, all-reduces) are never rehearsed.

Not rehearsed (they compile at their first launch, as before): calls whose sizes need a symbol other than the token
count, calls whose scratch would exceed ``SCRATCH_LIMIT_BYTES`` (a server's KV cache, a large LM head) or find no
free memory, and nodes without fake tensor metadata (graphs loaded from the compile cache keep only what the runner
reads: their kernels are in Triton's disk cache anyway). ``FXPASSES_COMPILE_AHEAD=0`` turns it off.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import sympy
import torch
import torch.fx

from fxpasses import compat, ops
from fxpasses.effects import effect_keys

log = logging.getLogger("fxpasses")

ENV = "FXPASSES_COMPILE_AHEAD"
SCRATCH_LIMIT_BYTES = 256 << 20  # per rehearsed call (an 8B gate/up weight is 235 MB); anything larger (a KV
# cache) compiles at its first launch. The caching allocator keeps the freed scratch for the model's own use.
MAX_WORKERS = 4  # measured: 4 threads 1.6 s, 8 threads 2.0 s, 16 threads 3.1 s for the same 11 kernels


@dataclass(frozen=True)
class CompileAheadResult:
    """What one runner compiled ahead: the report's line."""

    kernels: int  # Triton specializations compiled (and their launchers built) ahead
    rehearsed: int  # distinct (op, argument layout) calls rehearsed, over all sizes
    failed: int  # specializations whose compile ahead raised (their first launch compiles them, and says why)
    skipped: tuple[str, ...]  # why calls were left to compile at their first launch
    seconds: float  # from the rehearsal's start to the last kernel compiled
    workers: int
    waited: float = 0.0  # how long the first call waited for them (the rest overlapped the compile)

    def __str__(self) -> str:
        text = (f"compiled {self.kernels} Triton kernel(s) ahead in {self.seconds:.2f} s on {self.workers} thread(s), "
                f"the first call waited {self.waited:.2f} s ({self.rehearsed} op call(s) rehearsed")
        text += f", {self.failed} failed and left to their first launch" if self.failed else ""
        if self.skipped:
            text += f"; not rehearsed: {'; '.join(sorted(set(self.skipped)))}"
        return text + ")"


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0" and ops.GPU_KERNELS and torch.cuda.is_available() and supported()


class CompileAhead:
    """Rehearse now (on the calling thread: it needs the device and takes milliseconds), compile in the background;
    ``wait`` returns once every kernel is compiled."""

    def __init__(self, gm: torch.fx.GraphModule, token: sympy.Expr, sizes: Sequence[int]) -> None:
        self._t0 = time.perf_counter()
        self._skipped: list[str] = []
        try:
            with compat.outside_tracing(), torch.no_grad():
                recorded, self._rehearsed = self._rehearse(gm, token, sizes)
        except Exception as err:  # noqa: BLE001 - an optimization: without it every kernel compiles at its launch
            log.warning("fxpasses: compile-ahead skipped (%s: %s); kernels compile at their first launch",
                        type(err).__name__, err)
            self._skipped.append(f"every call: the rehearsal failed ({type(err).__name__}: {err})")
            recorded, self._rehearsed = [], 0
        self._workers = min(MAX_WORKERS, len(recorded), max(1, (os.cpu_count() or 1) // 2))
        self._futures: list[Future] = []
        if recorded:
            device = torch.cuda.current_device()
            pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fxpasses-compile-ahead")
            self._futures = [pool.submit(_compile, fn, data, device) for fn, data in recorded]
            pool.shutdown(wait=False)  # the submitted compiles still run; wait() collects them
        self.result: CompileAheadResult | None = None
        self.on_done: Callable[[CompileAheadResult], None] | None = None  # e.g. a note in the Backend's report

    def wait(self) -> CompileAheadResult:
        if self.result is None:
            t0 = time.perf_counter()
            failed = sum(not f.result() for f in self._futures)
            done = time.perf_counter()
            self.result = CompileAheadResult(len(self._futures) - failed, self._rehearsed, failed,
                                             tuple(self._skipped), done - self._t0, self._workers, done - t0)
            log.info("fxpasses: %s", self.result)
            if self.on_done is not None:
                self.on_done(self.result)
        return self.result

    def _rehearse(self, gm: torch.fx.GraphModule, token: sympy.Expr, sizes: Sequence[int]) -> tuple[list, int]:
        if torch.cuda.is_current_stream_capturing():  # a compile inside someone's capture: allocate nothing
            self._skipped.append("every call: the compile ran inside a CUDA-graph capture")
            return [], 0
        calls = [n for n in gm.graph.nodes if _has_triton_kernel(n)]
        seen: set[Any] = set()
        rehearsed = 0
        with _recording() as recorded:
            for size in sizes:
                bindings = {s: sympy.Integer(size) for s in token.free_symbols}
                for node in calls:
                    layouts = self._layouts(node, bindings)
                    if layouts is None or (node.target, layouts) in seen:
                        continue
                    seen.add((node.target, layouts))
                    args = _scratch(layouts)
                    if args is None:
                        self._skipped.append(f"{node.target}: no device memory for its scratch")
                        continue
                    try:
                        node.target(*args[0], **args[1])
                        rehearsed += 1
                    except Exception as err:  # noqa: BLE001 - its real call raises the same, with its own message
                        self._skipped.append(f"{node.target}: the rehearsal raised {type(err).__name__}")
                    del args
        unique: dict[tuple[int, str], tuple[Any, str]] = {}  # two calls may record one specialization
        for fn, key, data in recorded:
            unique.setdefault((id(fn), key), (fn, data))
        return list(unique.values()), rehearsed

    def _layouts(self, node: torch.fx.Node, bindings: dict[sympy.Symbol, sympy.Integer]) -> tuple | None:
        """The call's arguments at this size, each tensor as its ``Layout``; None (and why) if one cannot be had."""
        budget = [SCRATCH_LIMIT_BYTES]
        why: list[str] = []

        def concrete(value: Any) -> Any:
            if isinstance(value, torch.fx.Node):
                val = value.meta.get("val")
                if val is None:
                    why.append("nodes without fake tensor metadata")
                    return None
                value = val
            if isinstance(value, torch.SymInt):
                out = _concrete(value, bindings)
                if out is None:
                    why.append("sizes with symbols other than the token count")
                return out
            if isinstance(value, (torch.SymFloat, torch.SymBool)):
                why.append("a symbolic float or bool argument")
                return None
            if isinstance(value, torch.Tensor):
                return Layout.of(value, bindings, budget, why)
            return value

        args = _freeze(torch.fx.node.map_aggregate(node.args, concrete))
        kwargs = tuple(sorted((k, _freeze(v)) for k, v in torch.fx.node.map_aggregate(node.kwargs, concrete).items()))
        if why:
            self._skipped.append(f"{node.target}: {why[0]}")
            return None
        return args, kwargs


@dataclass(frozen=True)
class Layout:
    """A tensor argument at one captured size: what a Triton launch specializes on (and the device it is on)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(t: torch.Tensor, bindings: dict[sympy.Symbol, sympy.Integer], budget: list[int],
           why: list[str]) -> "Layout | None":
        shape = tuple(_concrete(s, bindings) for s in t.shape)
        stride = tuple(_concrete(s, bindings) for s in t.stride())
        offset = _concrete(t.storage_offset(), bindings)
        if None in shape or None in stride or offset is None:
            why.append("sizes with symbols other than the token count")
            return None
        layout = Layout(shape, stride, offset, t.dtype, t.device)  # type: ignore[arg-type]
        budget[0] -= layout.extent() * t.element_size()
        if budget[0] < 0:
            why.append(f"scratch above {SCRATCH_LIMIT_BYTES >> 20} MiB (a large cache)")
            return None
        return layout

    def extent(self) -> int:
        """Elements of storage the tensor spans from the storage's start."""
        return self.offset + (1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0)

    def zeros(self) -> torch.Tensor:
        """Zeros with this layout, in a fresh storage (the same 16-byte alignment class as the real tensor's
        whenever its offset is what makes the difference)."""
        return torch.zeros(max(self.extent(), 1), dtype=self.dtype, device=self.device).as_strided(
            self.shape, self.stride, self.offset)


def _freeze(value: Any) -> Any:
    """Lists to tuples, so a call's layouts can key a set."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _scratch(layouts: tuple) -> tuple[list, dict] | None:
    """The call's arguments with every Layout made zeros; None if the device has no memory for them."""
    def make(value: Any) -> Any:
        if isinstance(value, Layout):
            return value.zeros()
        return [make(v) for v in value] if isinstance(value, tuple) else value

    args, kwargs = layouts
    try:
        return [make(a) for a in args], {k: make(v) for k, v in kwargs}
    except torch.OutOfMemoryError:
        return None


def _has_triton_kernel(node: torch.fx.Node) -> bool:
    """An ``fxp`` op with a CUDA kernel of its own (ours are Triton) and no ordered effect: a collective or a
    registered side effect (a send) is never rehearsed, whatever its kernel."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, compat.OpOverload)
            and target.namespace == ops.NAMESPACE and target not in ops.SIDE_EFFECT_OPS
            and compat.has_kernel_for(target, "CUDA") and not effect_keys(node, set())[0])


def _concrete(value: Any, bindings: dict[sympy.Symbol, sympy.Integer]) -> int | None:
    if not isinstance(value, torch.SymInt):
        return int(value)
    expr = sympy.sympify(sympy.sympify(value.node.expr).xreplace(bindings))
    return int(expr) if expr.is_Integer else None


# ---- Triton: the only code here that knows Triton's hooks (3.6: knobs.runtime.jit_cache_hook, JITFunction.preload) --
@contextlib.contextmanager
def _recording() -> Iterator[list[tuple[Any, str, str]]]:
    """While inside, a Triton launch *on this thread* that would compile records (jit function, cache key,
    specialization data) and neither compiles nor launches. Triton's hook is process-wide: launches on other threads
    (a server still running requests, earlier compile-ahead workers) pass through untouched."""
    import triton

    recorded: list[tuple[Any, str, str]] = []
    owner = threading.get_ident()

    def hook(*, fn: Any, compile: dict[str, Any], **_: Any) -> bool | None:
        if threading.get_ident() != owner:
            return previous(fn=fn, compile=compile, **_) if previous is not None else None
        recorded.append((fn.jit_function, str(compile["key"]), compile["specialization_data"]))
        return True  # handled: _do_compile returns None and run() launches nothing

    knobs = triton.knobs.runtime
    previous = knobs.jit_cache_hook
    knobs.jit_cache_hook = hook
    try:
        yield recorded
    finally:
        knobs.jit_cache_hook = previous


def _compile(fn: Any, specialization_data: str, device: int) -> bool:
    """Compile one recorded specialization into the jit function's cache and build its launcher (the gcc step that
    a first launch would otherwise do); False if it raised (its first launch then compiles it and reports why)."""
    try:
        torch.cuda.set_device(device)
        kernel = fn.preload(specialization_data)
        init = getattr(kernel, "_init_handles", None)
        if init is not None:
            init()
        return True
    except Exception:  # noqa: BLE001 - an optimization: the launch path compiles and raises on its own
        log.debug("fxpasses: compiling a kernel ahead failed; its first launch compiles it", exc_info=True)
        return False


def supported() -> bool:
    """Is this Triton one whose hooks the rehearsal uses?"""
    try:
        import triton
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return hasattr(getattr(triton, "knobs", None), "runtime") and hasattr(JITFunction, "preload")
