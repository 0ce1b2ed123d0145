"""Every private torch API fxpasses touches, in one place: a leaf that every layer (ops, patterns, the rest) may import.

It imports nothing of ours, only torch.

CI runs torch 2.13, the GPU machine 2.11. When a torch upgrade breaks something, this module is where the fix
goes; nothing else imports ``torch._*`` internals that are known to move between releases.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def fake_store() -> Any:
    """The in-memory store torch's ``fake`` process-group backend needs."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def resolve_process_group(group_name: str) -> "torch.distributed.ProcessGroup":
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def symint_hint(value: Any) -> int | None:
    """The concrete value a SymInt was traced with (portable across 2.11 and 2.13); ints pass through."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        node = value.node
        hint = getattr(node, "hint", None)
        if hint is not None:
            return int(hint)
        shape_env = getattr(node, "shape_env", None)
        if shape_env is not None:
            # torch 2.13 renamed var_to_val (and warns on the old name); 2.11 has only var_to_val
            table = (shape_env.backed_var_to_val if hasattr(shape_env, "backed_var_to_val")
                     else getattr(shape_env, "var_to_val", {}))
            if node.expr in table:
                return int(table[node.expr])
    return None


def auto_functionalized_ops() -> tuple[Any, Any]:
    """The v1 and v2 auto-functionalization higher-order ops."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

    return auto_functionalized, auto_functionalized_v2


def set_auto_functionalized_v2(enabled: bool) -> Any:
    """Context manager choosing v1 or v2 auto-functionalization while tracing."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(enable_auto_functionalized_v2=enabled)


def source_name(source: Any) -> str:
    """A Dynamo Source's name (a method in 2.11, a property in 2.13)."""
    name = source.name
    return name() if callable(name) else name


def custom_graph_pass_base() -> type:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def register_dynamo_backend(name: str, fn: Any) -> None:
    from torch._dynamo.backends import registry

    if name not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=fn, name=name)


def make_boxed(fn: Any) -> Any:
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(fn)


def detect_fake_mode(inputs: Any) -> Any:
    from torch._guards import detect_fake_mode as detect

    return detect(inputs)


def fx_graph_cache_counters() -> tuple[int, int]:
    """(hits, misses) of Inductor's FX graph cache so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def inductor_option_names() -> set[str]:
    """Every option of torch._inductor.config, dotted (``triton.cudagraphs``)."""
    from torch._inductor import config

    return set(config.get_config_copy())


def inductor_decompositions() -> dict:
    """The decomposition table Inductor traces with: graphs on the Inductor path are decomposed with it, so
    patterns for that path are traced with it too."""
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


@contextlib.contextmanager
def outside_tracing() -> Iterator[None]:
    """Leave the compile in progress (its TracingContext and fake mode) for a while.

    A Backend made inside ``torch.compile`` (``backend="fxpasses"``) traces its patterns there; without this, the
    patterns' symbolic sizes land in the user's ShapeEnv and Dynamo fails making guards for them."""
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with tracing(None), unset_fake_temporarily():
        yield


def mark_unbacked(t: torch.Tensor, dim: int) -> None:
    """Dynamo's unbacked marking (a size it neither specializes nor guards on); a decorator module in 2.11-2.13."""
    from torch._dynamo.decorators import mark_unbacked as mark

    mark(t, dim)


# Operator types: every op in a graph is one of these (torch keeps them in the private torch._ops module).
OpOverload = torch._ops.OpOverload
HigherOrderOperator = torch._ops.HigherOrderOperator


def side_effectful_functions() -> set:
    """Targets FX's dead-code elimination never removes (``has_side_effect`` adds to this set)."""
    return torch.fx.node._side_effectful_functions


def aot_module_simplified(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
    """AOT autograd's entry for a backend: functionalizes the Dynamo graph and hands it to ``fw_compiler``."""
    from torch._functorch.aot_autograd import aot_module_simplified as aot

    return aot(gm, example_inputs, **kwargs)


def inductor_compile(gm: torch.fx.GraphModule, example_inputs: Any, options: dict[str, Any]) -> Any:
    """Inductor's compile of an AOT-ready graph, with its config patched by ``options`` for this call only."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    with inductor_config.patch(options):
        return compile_fx(gm, example_inputs)


def functional_collectives() -> Any:
    """``torch.distributed._functional_collectives``: traceable collectives (all_reduce returning a new tensor)."""
    from torch.distributed import _functional_collectives

    return _functional_collectives


def clear_dtensor_caches() -> None:
    """Forget DTensor's sharding-propagation cache. It compares meshes by ranks, so a later mesh over the same ranks
    (another model, a later fake world) would otherwise trace with an earlier mesh's process group."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:  # a torch without DTensor
        return
    _clear_sharding_prop_cache()


# ---- Python functionalization (AOT autograd's), for re-tracing a captured graph into one canonical form ---------
@contextlib.contextmanager
def functionalization() -> Iterator[None]:
    """The modes AOT autograd traces under: the Python dispatcher and ``FunctionalTensorMode`` (aten in-place ops
    and views become functional; mutating custom ops become ``auto_functionalized`` as
    ``enable_auto_functionalized_v2`` says). Enter it around ``make_fx``."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    with enable_python_dispatcher(), FunctionalTensorMode(pre_dispatch=False, export=False,
                                                          _allow_token_discovery=True):
        yield


@contextlib.contextmanager
def below_functionalization() -> Iterator[None]:
    """Inside the traced function: keep C++ functionalization off so the Python mode does it (AOT's note
    'Disabling Functionalize TLS Above Python Functionalization')."""
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize)):
        yield


def to_functional(value: Any) -> Any:
    """Wrap a tensor in a FunctionalTensor (other values pass through)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return FunctionalTensor.to_functional(value) if isinstance(value, torch.Tensor) else value


def is_functional(value: Any) -> bool:
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(value, FunctionalTensor)


def from_functional(value: Any) -> Any:
    """The current value of a FunctionalTensor (pending view updates applied first); other values pass through."""
    if not is_functional(value):
        return value
    torch._sync(value)
    return torch._from_functional_tensor(value.elem)


def functional_mutations(value: Any) -> tuple[bool, bool]:
    """(data written, metadata changed) for a FunctionalTensor that wrapped a graph input."""
    torch._sync(value)
    return (bool(torch._functionalize_has_data_mutation(value.elem)),
            bool(torch._functionalize_has_metadata_mutation(value.elem)))


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do two tensors (functional ones included) share one storage, i.e. alias?"""
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())


def fake_tensor_mode_of(value: Any) -> Any:
    """The FakeTensorMode a fake tensor belongs to, or None for anything else."""
    from torch._subclasses.fake_tensor import FakeTensor

    return value.fake_mode if isinstance(value, FakeTensor) else None


def new_fake_tensor_mode() -> Any:
    """A fresh FakeTensorMode with static shapes (for graphs whose metadata came from several modes, or none)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=False)


# ---- fxpasses' compile cache (fxpasses/compile_cache.py): AOT's metadata, graph pickling, shape-env state ---------
def aot_forward_metadata() -> Any:
    """AOT autograd's ViewAndMutationMeta for the forward being compiled (inside ``fw_compiler``), or None."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    return getattr(ctx, "fw_metadata", None) if ctx is not None else None


def pickle_graph_module(gm: torch.fx.GraphModule, keep_values: bool) -> bytes:
    """A GraphModule as bytes (torch's GraphPickler; every op allowed). ``keep_values`` keeps each node's
    ``meta['val']`` (fake tensors and SymInts: slow to load, needed by the CUDA-graph runner), else no metadata."""
    from torch.fx._graph_pickler import GraphPickler, Options

    metas = {node: node.meta for node in gm.graph.nodes}  # metadata filtered here: 2.11's Options may lack the filter
    try:
        for node, meta in metas.items():
            node.meta = {"val": meta["val"]} if keep_values and "val" in meta else {}
        return GraphPickler.dumps(gm, Options(ops_filter=None))
    finally:
        for node, meta in metas.items():
            node.meta = meta


def unpickle_graph_module(data: bytes) -> torch.fx.GraphModule:
    """The GraphModule ``pickle_graph_module`` wrote, its fake values in a fresh FakeTensorMode and ShapeEnv."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    class QuietShapeEnv(ShapeEnv):
        """A ShapeEnv that skips the stack summary of an INFO log line nobody reads. Unpickling a symbolic-size
        fake tensor on torch 2.11 assumes a data-dependent fact, and ``_log_suppressed_dde`` builds its message's
        stack summary before logging: that imports ``torch.export._trace`` (and through it AOT autograd and
        Inductor), 2.3 s of a 3 s warm start on the H200. The log line is kept wherever INFO is enabled."""

        def _log_suppressed_dde(self, *args: Any, **kwargs: Any) -> None:
            if logging.getLogger("torch.fx.experimental.symbolic_shapes").isEnabledFor(logging.INFO):
                super()._log_suppressed_dde(*args, **kwargs)

    gm = GraphPickler.loads(data, FakeTensorMode(shape_env=QuietShapeEnv()))
    gm.recompile()
    return gm


def shape_env_facts(shape_env: Any) -> dict[str, Any]:
    """What a ShapeEnv assumes (guards, replacements, value ranges, runtime asserts), as strings: equal facts mean a
    graph traced under one is valid under the other; growth during a compile means that compile added guards."""
    if shape_env is None:
        return {}
    asserts = getattr(shape_env, "deferred_runtime_asserts", {}) or {}
    return {
        "guards": [str(g.expr) for g in getattr(shape_env, "guards", ())],
        "replacements": sorted(f"{k}={v}" for k, v in getattr(shape_env, "replacements", {}).items()),
        "ranges": sorted(f"{k}:{v}" for k, v in getattr(shape_env, "var_to_range", {}).items()),
        "divisible": sorted(str(d) for d in getattr(shape_env, "divisible", ())),
        "asserts": sorted(str(a.expr) for values in asserts.values() for a in values),
    }


def mark_dynamic_output_dims(t: torch.Tensor, dims: Any) -> None:
    """What AOT's runtime wrapper does to an output whose dims were dynamic: later compiles see them as dynamic."""
    try:
        from torch._functorch._aot_autograd.runtime_wrappers import mark_dynamo_propagated_dynamic_indices
    except ImportError:  # torch 2.11 has no helper: set the attribute the helper sets (what Dynamo reads)
        t._dynamo_propagated_dynamic_indices = set(dims) | getattr(t, "_dynamo_propagated_dynamic_indices", set())
        return
    mark_dynamo_propagated_dynamic_indices(t, set(dims))


def functorch_config_digest() -> str:
    """AOT autograd's config (it changes how a graph is traced), as a stable string."""
    import torch._functorch.config as functorch_config

    return repr(sorted((k, repr(v)) for k, v in functorch_config.get_config_copy().items()))


def auto_functionalized_v2_enabled() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.enable_auto_functionalized_v2)


def p2p_compilation() -> Any:
    """A context manager under which Dynamo compiles ``dist.isend`` / ``dist.irecv`` (torch 2.13's
    ``enable_p2p_compilation``: ``_c10d_functional.isend`` / ``irecv`` plus ``wait_tensor``); None on a torch
    without it (2.11), where point-to-point in a compiled graph goes through ``fxp.pp_send`` / ``pp_recv``."""
    import torch._dynamo.config as dynamo_config

    if not hasattr(dynamo_config, "enable_p2p_compilation"):
        return None
    return dynamo_config.patch(enable_p2p_compilation=True)


def dynamo_compile_times() -> str:
    """Dynamo's per-phase compile times of this process (``torch._dynamo.utils.compile_times``), as a table."""
    from torch._dynamo.utils import compile_times

    return str(compile_times(repr="str", aggregate=True))


# ---- fxpasses.precompile: Dynamo's AOT compile (torch/_dynamo/aot_compile.py), saved and loaded without tracing ----
def serializable_callable_base() -> type:
    """The ABC a backend's result must implement for Dynamo's AOT save/load (``SerializableCallable``), or ``object``
    on a torch without it (then fxpasses.precompile always falls back to torch.compile)."""
    try:
        from torch._dynamo.aot_compile_types import SerializableCallable
    except ImportError:
        return object
    return SerializableCallable


def aot_precompile_missing() -> str | None:
    """Why this torch cannot AOT-compile a function and save it (None when it can)."""
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction, aot_compile_fullgraph  # noqa: F401
        from torch._dynamo.aot_compile_types import SerializableCallable  # noqa: F401
        from torch._dynamo.hooks import Hooks  # noqa: F401
    except ImportError as err:
        return f"torch {torch.__version__} has no Dynamo AOT compile ({err})"
    return None


def _restore_marked_guard_tensor(args: tuple[Any, ...], marks: dict[str, Any]) -> Any:
    """Unpickles a guard's fake tensor with the dim marks (``mark_dynamic``/``mark_unbacked``) it was traced with."""
    from torch._dynamo.guards import GuardsStatePickler

    t = GuardsStatePickler._unpickle_tensor(*args)
    for name, value in marks.items():
        setattr(t, name, value)
    return t


def _dim_marks(t: torch.Tensor) -> dict[str, Any]:
    attrs = getattr(t, "__dict__", None) or {}
    return {k: v for k, v in attrs.items() if k.startswith("_dynamo_") or k == "_has_dynamo_dim_marking"}


@contextlib.contextmanager
def _portable_guards_pickler() -> Iterator[None]:
    """Two fixes to Dynamo's guard pickler (2.11-2.13) while an AOT compile builds its guards:
    - a module attribute that no guard reads is saved as "missing" by ``id``; a dtype or device is a singleton, so a
      model holding ``self.dtype = torch.float32`` made every float32 in the guards (the parameters' meta tensors)
      missing, and the load failed. These immutable singletons are pickled by value instead.
    - a guard's tensor is pickled without its dim marks, so a loaded guard demanded unmarked inputs
      ("_has_dynamo_dim_marking is present on runtime tensor but was absent at compile time"): marks are kept."""
    import torch._dynamo.guards as guards

    base = getattr(guards, "GuardsStatePickler", None)
    if base is None or not hasattr(base, "reducer_override") or not hasattr(base, "_unpickle_tensor"):
        yield
        return

    class PortableGuardsStatePickler(base):  # type: ignore[misc, valid-type]
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
                return NotImplemented
            reduced = super().reducer_override(obj)
            if (isinstance(obj, torch.Tensor) and isinstance(reduced, tuple) and len(reduced) == 2
                    and reduced[0] == type(self)._unpickle_tensor):
                marks = _dim_marks(obj)
                if marks:
                    return _restore_marked_guard_tensor, (reduced[1], marks)
            return reduced

    guards.GuardsStatePickler = PortableGuardsStatePickler
    try:
        yield
    finally:
        guards.GuardsStatePickler = base


def aot_compile_fullgraph(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], backend: Any) -> Any:
    """Dynamo's whole-graph AOT compile of ``fn`` (a bound method: its ``self`` becomes the first argument of the
    result); ``backend`` must return a ``SerializableCallable``. Raises what Dynamo raises (graph breaks included)."""
    from torch._dynamo.aot_compile import aot_compile_fullgraph as compile_fullgraph
    from torch._dynamo.hooks import Hooks

    with _portable_guards_pickler():
        return compile_fullgraph(fn, (tuple(args), dict(kwargs)), hooks=Hooks(), backend=backend)


@contextlib.contextmanager
def plain_autograd_cache() -> Iterator[None]:
    """AOT autograd's cache settings as outside an AOT compile: Dynamo's AOT compile forces and bundles AOT's cache
    for Inductor; a backend with its own ``fw_compiler`` (ours) has nothing for that cache to hold."""
    import torch._functorch.config as functorch_config

    wanted = {"strict_autograd_cache": False, "force_autograd_cache": False, "bundled_autograd_cache": False,
              "bypass_autograd_cache_key": False, "force_non_lazy_backward_lowering": False}
    with functorch_config.patch({k: v for k, v in wanted.items() if hasattr(functorch_config, k)}):
        yield


def serialize_aot_compiled(compiled: Any) -> bytes:
    """An ``AOTCompiledFunction`` as bytes (2.13 returns a result object holding them, older torch the bytes)."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    result = AOTCompiledFunction.serialize(compiled)
    return getattr(result, "serialized_data", result)


def deserialize_aot_compiled(data: bytes, f_globals: dict[str, Any] | None) -> Any:
    """The ``AOTCompiledFunction`` ``serialize_aot_compiled`` wrote: bytecode, guards and backend result, no trace."""
    import inspect

    from torch._dynamo.aot_compile import AOTCompiledFunction

    if "f_globals" in inspect.signature(AOTCompiledFunction.deserialize).parameters:
        return AOTCompiledFunction.deserialize(data, f_globals)
    return AOTCompiledFunction.deserialize(data)  # older torch: the bytecode's module globals


def aot_compiled_parts(compiled: Any) -> tuple[Any, Any]:
    """(the backend's callable, the compiled bytecode's function without its guard check) of an AOTCompiledFunction
    (where a torch keeps no such function, the AOTCompiledFunction itself, which checks its guards again)."""
    return compiled._artifacts.compiled_fn, getattr(compiled, "fn", compiled)


def aot_guard_failure(compiled: Any, *args: Any, **kwargs: Any) -> str | None:
    """Why an AOTCompiledFunction's guards reject these arguments, or None when they pass."""
    if compiled.guard_check(*args, **kwargs):
        return None
    try:
        from torch._dynamo.aot_compile import bind_locals

        f_locals = bind_locals(compiled._artifacts.signature, *args, **kwargs)
        return str(compiled._artifacts.guard_manager.check_verbose(f_locals))
    except Exception as err:  # noqa: BLE001  (the reason is for a log line only)
        return f"guard check failed ({type(err).__name__})"


def dynamo_frames_traced() -> int:
    """How many graphs Dynamo traced in this process (its ``unique_graphs`` counter); a loaded AOT compile adds none."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def dynamo_config_digest() -> str:
    """Dynamo's config (it changes what is traced and guarded), as a stable string; entries that only say where
    debug output goes are left out (``debug_dir_root`` follows the working directory)."""
    import torch._dynamo.config as dynamo_config

    ignored = {"debug_dir_root", "log_file_name", "log_compilation_metrics", "log_graph_in_out_metadata"}
    return repr(sorted((k, _stable_repr(v)) for k, v in dynamo_config.get_config_copy().items() if k not in ignored))


def _stable_repr(value: Any) -> str:
    """``repr`` with sets sorted, so equal configs give equal strings in every process."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(map(_stable_repr, value))) + "}"
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "(" + ", ".join(map(_stable_repr, value)) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(f"{_stable_repr(k)}: {_stable_repr(v)}" for k, v in value.items())) + "}"
    return repr(value)


def optimized_module_type() -> type:
    """The module wrapper ``torch.compile(module)`` returns."""
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def pickle_graph_module_values(gm: torch.fx.GraphModule, keep: Any) -> bytes:
    """``pickle_graph_module`` keeping ``meta['val']`` on the nodes in ``keep`` only (no other metadata): loading a
    fake tensor per node is most of a large graph's load time, and a runner reads few of them."""
    from torch.fx._graph_pickler import GraphPickler, Options

    metas = {node: node.meta for node in gm.graph.nodes}
    try:
        for node, meta in metas.items():
            node.meta = {"val": meta["val"]} if node in keep and "val" in meta else {}
        return GraphPickler.dumps(gm, Options(ops_filter=None))
    finally:
        for node, meta in metas.items():
            node.meta = meta


def has_kernel_for(op: "OpOverload", dispatch_key: str) -> bool:
    """Does ``op`` have a kernel registered for this dispatch key itself (not a composite or fallback)?"""
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), dispatch_key))


def symm_mem_unavailable(device: torch.device) -> str | None:
    """Why torch's symmetric memory cannot serve ``device`` (None when it can): the fused all-reduce kernels
    (ops.triton_allreduce) need its peer pointers. A fact of the build and the device, so the same on every rank."""
    if device.type != "cuda":
        return f"the tensors are on {device}, not CUDA"
    if not torch.distributed.is_available():
        return "this torch build has no torch.distributed"
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError as err:
        return f"torch.distributed._symmetric_memory does not import ({err})"
    if not hasattr(symm_mem, "rendezvous") or not hasattr(symm_mem, "empty"):
        return "this torch's symmetric memory has no empty/rendezvous"
    return None


def symm_mem_rendezvous(nbytes: int, device: torch.device, group_name: str) -> tuple[torch.Tensor, Any]:
    """Allocate ``nbytes`` of symmetric memory on ``device`` and rendezvous it over ``group_name`` (collective:
    every rank of the group must call it, outside any CUDA-graph capture). Returns (local buffer, handle)."""
    import torch.distributed._symmetric_memory as symm_mem

    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    return buffer, symm_mem.rendezvous(buffer, group_name)


def symm_mem_signal_pad_bytes() -> int:
    """Bytes of each symmetric allocation's signal pad (torch's default where this build has no getter)."""
    import torch.distributed._symmetric_memory as symm_mem

    getter = getattr(symm_mem, "get_signal_pad_size", None)
    if getter is not None:
        return int(getter())
    return int(getattr(torch._C._distributed_c10d._SymmetricMemory, "signal_pad_size", 2048))
