"""fxpasses.precompile: a saved compile loaded in a new process without a Dynamo trace, equal to eager at 1 and 32
tokens with live weights and an in-place KV cache; stale, corrupt and unsupported cases recompile or fall back."""
import sys
import textwrap

import pytest
import torch

import fxpasses
from fxpasses import compat
from fxpasses.testing import RankPool
from pattern_helpers import LinearWithCache, double_to_add, run_fresh_process


# One server start: precompile the reference Llama (1 layer, KV cache written in the graph), serve 1 and 32 tokens,
# then change a weight in place (the loaded function must read it).
SERVE = textwrap.dedent("""
    import dataclasses, json, sys, torch, fxpasses
    from fxpasses import compat
    from fxpasses.models import Batch, LlamaConfig, build_model
    config = dataclasses.replace(LlamaConfig(max_slots=32), num_layers=1)
    model, eager = build_model("llama", config), build_model("llama", config)

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, config.vocab_size, (n,), generator=g), torch.randint(0, 8, (n,), generator=g),
                torch.randperm(32, generator=g)[:n])

    def step(fn, n, seed):
        args = batch(n, seed)
        fxpasses.mark_token_dim(*args)
        return fn(*args).clone(), eager(*batch(n, seed))

    report = {}
    with torch.inference_mode():
        backend = fxpasses.Backend(cache=sys.argv[1])  # patterns traced only if the graph is compiled
        compiled = fxpasses.precompile(model, batch(4, 0), backend=backend)  # saved in the Backend's cache dir
        report["traced_at_start"] = compat.dynamo_frames_traced()
        outs = [step(compiled, n, seed) for seed, n in enumerate((1, 32, 1))]
        report["equal"] = [torch.equal(a, b) for a, b in outs]
        report["cache_equal"] = all(torch.equal(a, b) for a, b in zip(model.buffers(), eager.buffers()))
        report["cache_written"] = any(bool(b.abs().sum() > 0) for b in model.buffers())
    with torch.no_grad():
        for m in (model, eager):
            m.layers[0].mlp.down.weight.mul_(-0.5)
    with torch.inference_mode():
        after, ref = step(compiled, 32, 1)
        report["weight_live"] = torch.equal(after, ref) and not torch.equal(after, outs[1][0])
    report.update(loaded=compiled.status.loaded, saved=compiled.status.saved, fallback=compiled.status.fallback,
                  reason=compiled.status.reason, traced=compat.dynamo_frames_traced(),
                  graphs=backend.report.graphs, matches=backend.report.matches,
                  patterns_traced=backend.pattern_setup_seconds > 0)
    print(json.dumps(report))
""")


def _serve(cache_dir):
    return run_fresh_process(SERVE, str(cache_dir), FXPASSES_VERIFY="0")


def test_saved_in_one_process_loaded_in_another_without_a_trace(tmp_path):
    first = _serve(tmp_path)
    assert (first["loaded"], first["saved"], first["fallback"]) == (False, True, False), first["reason"]
    assert first["traced_at_start"] == 1
    second = _serve(tmp_path)
    assert second["loaded"], second["reason"]
    assert second["traced_at_start"] == 0 and second["traced"] == 0, "a loaded compile must not trace with Dynamo"
    assert second["graphs"] == 1 and second["matches"] == first["matches"] and first["matches"]
    assert first["patterns_traced"] and not second["patterns_traced"], "a load traces no pattern"
    for run in (first, second):
        assert run["equal"] == [True, True, True], "1 and 32 tokens must equal eager bit for bit"
        assert run["cache_written"] and run["cache_equal"], "the KV cache must be written in place, as eager does"
        assert run["weight_live"], "a weight changed after the start must change the output as in eager"


# ---- in one process: a load from disk adds no Dynamo trace; stale keys, corrupt files, fallbacks ----------------
class Cached(LinearWithCache):
    """``LinearWithCache`` with 64 slots."""

    def __init__(self):
        super().__init__(64)




def _inputs(n, dtype=torch.float32):
    return torch.arange(n * 8, dtype=dtype).reshape(n, 8) / 10, torch.arange(n) * 2


def _pair(model_cls=Cached, dtype=torch.float32):
    torch.manual_seed(0)
    model, eager = model_cls().to(dtype), model_cls().to(dtype)
    eager.load_state_dict(model.state_dict())
    return model, eager


def _start(path, model_cls=Cached, dtype=torch.float32, **backend_kwargs):
    """precompile a fresh model; checks 1 and 32 tokens and the written cache against eager."""
    model, eager = _pair(model_cls, dtype)
    backend = fxpasses.Backend(cache=False, patterns=backend_kwargs.pop("patterns", [double_to_add]),
                               **backend_kwargs)
    with torch.inference_mode():
        compiled = fxpasses.precompile(model, _inputs(4, dtype), backend=backend, path=path)
        for n in (1, 32):
            args = _inputs(n, dtype)
            fxpasses.mark_token_dim(*args)
            assert torch.equal(compiled(*args), eager(*_inputs(n, dtype))), f"{n} tokens differ from eager"
    assert torch.equal(model.cache, eager.cache)
    return compiled


def test_load_in_process_equal_and_stale_keys_recompile(tmp_path):
    first = _start(tmp_path)
    assert first.status.saved and not first.status.loaded and first.backend.report.matches == {"double_to_add": 1}
    traced = compat.dynamo_frames_traced()
    again = _start(tmp_path)
    assert again.status.loaded and again.status.key == first.status.key
    assert compat.dynamo_frames_traced() == traced, "a load traces nothing"
    assert again.backend.report.matches == {"double_to_add": 1}, "the report is replayed from the saved graph"

    stale = {
        "backend config": _start(tmp_path, patterns=[]),
        "input spec": _start(tmp_path, dtype=torch.float64),
        "model code": _start(tmp_path, model_cls=_edited_model(tmp_path, "")),
    }
    for what, compiled in stale.items():
        assert not compiled.status.loaded and compiled.status.saved, f"a changed {what} must be a miss"
        assert compiled.status.key != first.status.key
    assert stale["backend config"].backend.report.matches == {}
    assert _start(tmp_path, model_cls=_edited_model(tmp_path, " + 1")).status.key != stale["model code"].status.key


def _edited_model(tmp_path, edit):
    """``Cached`` from a module file (``precompile_user_model``), its forward edited by ``edit``, imported afresh
    (as a restarted server imports its edited code): another key."""
    import importlib

    (tmp_path / "precompile_user_model.py").write_text(textwrap.dedent(f"""
        import torch

        class Cached(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 8)
                self.register_buffer("cache", torch.zeros(64, 8))

            def forward(self, x, slots):
                h = self.lin(x) * 2{edit}
                self.cache.index_copy_(0, slots, h)
                return h.relu() + self.cache.sum()
    """))
    sys.modules.pop("precompile_user_model", None)
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.invalidate_caches()
        return importlib.import_module("precompile_user_model").Cached
    finally:
        sys.path.remove(str(tmp_path))


def test_corrupt_file_is_a_miss_and_is_rewritten(tmp_path):
    first = _start(tmp_path)
    blob = bytearray(first.status.path.read_bytes())
    blob[-10] ^= 0xFF
    first.status.path.write_bytes(bytes(blob))
    second = _start(tmp_path)
    assert not second.status.loaded and second.status.saved and "corrupt" in second.status.reason
    assert _start(tmp_path).status.loaded, "the miss rewrote a good file"
    first.status.path.write_bytes(b"")
    assert "corrupt" in _start(tmp_path).status.reason


class Breaks(Cached):
    def forward(self, x, slots):
        h = self.lin(x)
        torch._dynamo.graph_break()
        return h * 2


def test_graph_break_falls_back_to_torch_compile(tmp_path, caplog):
    model, eager = _pair(Breaks)
    with torch.inference_mode():
        compiled = fxpasses.precompile(model, _inputs(4), backend=fxpasses.Backend(cache=False, patterns=[]),
                                       path=tmp_path)
        assert compiled.status.fallback and not compiled.status.saved
        assert "whole-graph AOT compile failed" in compiled.status.reason
        assert torch.equal(compiled(*_inputs(4)), eager(*_inputs(4)))
    assert "compiling with torch.compile instead" in caplog.text
    assert not list(tmp_path.rglob("*.fxpc"))


def test_graph_needing_aot_wrappers_is_refused_and_falls_back(tmp_path):
    """With grad on, the parameters require grad: a training graph, whose AOT wrapper does work. Never saved."""
    model, eager = _pair()
    compiled = fxpasses.precompile(model, _inputs(4), backend=fxpasses.Backend(cache=False, patterns=[]),
                                   path=tmp_path)
    assert compiled.status.fallback and "cannot be served without AOT autograd's wrappers" in compiled.status.reason
    out = compiled(*_inputs(4))
    torch.testing.assert_close(out, eager(*_inputs(4)), rtol=0, atol=0)
    assert out.requires_grad and not list(tmp_path.rglob("*.fxpc"))


def test_inputs_the_guards_reject_run_through_torch_compile(tmp_path):
    compiled = _start(tmp_path)
    model, eager = compiled.model, _pair()[1]
    eager.cache.copy_(model.cache)
    with torch.inference_mode():
        x = torch.ones(3, 8, dtype=torch.float64)  # another dtype: the saved guards say no
        model.double(), eager.double()
        out = compiled(x, torch.arange(3))
        assert torch.equal(out, eager(x, torch.arange(3)))
    assert compiled.guard_misses == 1 and compiled.status.saved


def test_bad_arguments_are_named():
    model = Cached()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fxpasses.precompile(lambda x: x, (torch.ones(1),))
    with pytest.raises(TypeError, match="already torch.compile'd"):
        fxpasses.precompile(torch.compile(model), _inputs(2))
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        fxpasses.precompile(model, torch.ones(2, 8))
    with pytest.raises(TypeError, match="backend must be a fxpasses.Backend"):
        fxpasses.precompile(model, _inputs(2), backend="inductor")
    with pytest.raises(ValueError, match="dynamic names argument positions"):
        fxpasses.precompile(model, _inputs(2), backend=fxpasses.Backend(cache=False, patterns=[]), dynamic=[5])


def test_cuda_graph_runner_is_rebuilt_after_load_on_cpu(tmp_path):
    """The runner of ``cuda_graph_sizes`` is a process's own: a load builds it again from the saved graph (here
    without CUDA: each size's first call is its warm-up, run eagerly), with the token input found again."""
    import dataclasses

    from fxpasses.models import LlamaConfig, build_model
    from fxpasses.testing import warmup_cuda_graph_backend

    config = dataclasses.replace(LlamaConfig(max_slots=32), num_layers=2)
    statuses, runners = [], []
    for _ in range(2):
        model, eager = build_model("llama", config), build_model("llama", config)
        backend = warmup_cuda_graph_backend([1, 32], patterns=[])
        with torch.inference_mode():
            example = (torch.arange(4), torch.zeros(4, dtype=torch.long), torch.arange(4))
            compiled = fxpasses.precompile(model, example, backend=backend, path=tmp_path)
            for n in (1, 32):
                args = (torch.arange(n) % config.vocab_size, torch.full((n,), 2), torch.arange(n))
                fxpasses.mark_token_dim(*args)
                assert torch.equal(compiled(*args), eager(*args)), f"{n} tokens differ from eager"
        assert len(backend.runners) == 1 and backend.runners[0].sizes == [1, 32]
        assert backend.token_dims[0] is not None and backend.token_dims[0].is_dynamic
        statuses.append(compiled.status)
        runners.append(backend.runners[0])
    assert statuses[0].saved and statuses[1].loaded, (str(statuses[0]), str(statuses[1]))
    # the saved graph keeps only the values the runner reads: it must decide as the runner of the full graph did
    fresh, loaded = runners
    assert loaded.layout == fresh.layout and loaded.pad_values == fresh.pad_values
    assert fresh.layout.tensor_inputs and fresh.layout.token_outputs

    def eager_token_args(runner):
        return {name: piece.token_args for name, piece in runner.pieces.items() if hasattr(piece, "token_args")}

    assert eager_token_args(loaded) == eager_token_args(fresh) and any(eager_token_args(fresh).values())


def _tp_rank(rank, world_size, path):
    """One TP rank: precompile its shard twice (a save, then a load from disk), 1 and 32 tokens each time."""
    import dataclasses

    from fxpasses import Mapping, init_process_groups
    from fxpasses.models import LlamaConfig, build_model

    mapping = Mapping(world_size=world_size, rank=rank, tp_size=world_size, pp_size=1)
    torch._dynamo.reset()
    init_process_groups(mapping)
    config = dataclasses.replace(LlamaConfig(max_slots=32), num_layers=2)
    runs = []
    for _ in range(2):
        model, eager = build_model("llama", config, mapping), build_model("llama", config, mapping)
        backend = fxpasses.Backend(mapping, cache=False, patterns=["allreduce_add_rms_norm"])
        with torch.inference_mode():
            example = (torch.arange(4), torch.zeros(4, dtype=torch.long), torch.arange(4))
            compiled = fxpasses.precompile(model, example, backend=backend, path=path)
            pairs = []
            for n in (1, 32):
                args = (torch.arange(n) % config.vocab_size, torch.full((n,), 2), torch.arange(n))
                fxpasses.mark_token_dim(*args)
                pairs.append((compiled(*args).clone(), eager(*args)))
        runs.append((compiled.status.loaded, compiled.status.saved, compiled.status.reason,
                     dict(backend.report.matches), pairs))
    return runs


@pytest.mark.multirank
@pytest.mark.slow
def test_tensor_parallel_ranks_save_and_load_their_shards(tmp_path):
    """TP=2 on gloo: each rank saves its own compile (the rank is in the key) and loads it; collectives included."""
    with RankPool(2, timeout=300) as pool:
        results = pool.run(_tp_rank, str(tmp_path))
    assert len(list(tmp_path.rglob("*.fxpc"))) == 2, "one saved compile per rank"
    for (loaded0, saved0, why0, matches0, first), (loaded1, _, why1, matches1, second) in results:
        assert saved0 and not loaded0, why0
        assert loaded1, why1
        assert matches1 == matches0 and matches0.get("allreduce_add_rms_norm", 0) > 0
        for (a, ref), (b, _) in zip(first, second):
            assert torch.equal(a, b), "the loaded graph computes what the saved one did"
            torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_are_rebuilt_after_load(tmp_path):
    """Full CUDA graphs (splitting_ops=()): saved, loaded, captured again lazily; equal to eager at 1 and 32."""
    import dataclasses

    from fxpasses.models import LlamaConfig, build_model

    config = dataclasses.replace(LlamaConfig(max_slots=32), num_layers=1, dtype=torch.bfloat16)
    results, outs = [], []
    for _ in range(2):
        with torch.device("cuda"):
            model, eager = build_model("llama", config), build_model("llama", config)
        backend = fxpasses.Backend(cache=False, cuda_graph_sizes=[1, 32], splitting_ops=())
        with torch.inference_mode():
            example = (torch.arange(4, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda"),
                       torch.arange(4, device="cuda"))
            compiled = fxpasses.precompile(model, example, backend=backend, path=tmp_path)
            for n in (1, 32):
                args = (torch.arange(n, device="cuda") % config.vocab_size, torch.full((n,), 2, device="cuda"),
                        torch.arange(n, device="cuda"))
                fxpasses.mark_token_dim(*args)
                out = compiled(*args).clone()
                torch.testing.assert_close(out.float(), eager(*args).float(), rtol=2e-2, atol=2e-2)
                outs.append(out)
        assert len(backend.runners) == 1
        results.append(compiled.status)
    assert results[0].saved and results[1].loaded, (str(results[0]), str(results[1]))
    assert all(torch.equal(a, b) for a, b in zip(outs[:2], outs[2:])), "the loaded graph runs the saved one's kernels"
