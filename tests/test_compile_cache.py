"""fxpasses' compile cache (non-Inductor path): a hit after a restart, a miss after every change that changes the
result, corrupt entries, concurrent writers, graphs it refuses, and the cache off. Every compiled output is
compared with eager."""
import dataclasses
import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fxpasses
from fxpasses import cache_key
from fxpasses.compile_cache import CacheStore, default_cache_dir, resolve_cache_dir
from fxpasses.passes import PassResult
from pattern_helpers import LinearWithCache, double_to_add, run_fresh_process
from fxpasses.testing import RankPool


# A restarted process: the reference Llama (1 layer, KV cache written in the graph), compiled with a cache dir.
RESTART = textwrap.dedent("""
    import dataclasses, json, sys, torch, fxpasses
    from fxpasses.models import LlamaConfig, build_model, make_steps, run_steps
    config = dataclasses.replace(LlamaConfig(), num_layers=1)
    steps = make_steps(config.vocab_size, decode_steps=1)
    eager = run_steps(build_model("llama", config), steps)
    model = build_model("llama", config)
    backend = fxpasses.Backend(cache=sys.argv[1])
    compiled = run_steps(model, steps, torch.compile(model, backend=backend))
    print(json.dumps({
        "equal": all(torch.equal(a, b) for a, b in zip(compiled, eager)),
        "events": [dataclasses.asdict(e) for e in backend.cache_events],
        "traced": backend.pattern_setup_seconds > 0,
        "matches": backend.report.matches,
    }))
""")


def _restart(cache_dir):
    return run_fresh_process(RESTART, str(cache_dir))


def test_hit_after_a_restart(tmp_path):
    first = _restart(tmp_path)
    assert first["equal"] and first["traced"]
    assert [(e["hit"], e["stored"]) for e in first["events"]] == [(False, True)]
    second = _restart(tmp_path)
    assert second["equal"], "a served graph must give eager's numbers"
    assert [e["hit"] for e in second["events"]] == [True]
    assert not second["traced"], "a process whose graphs all hit traces no pattern"
    assert second["matches"] == first["matches"] and second["matches"].get("add_rms_norm", 0) > 0


# ---- in one process: torch._dynamo.reset() and a new Backend stand for a restart -------------------------------
Tiny = LinearWithCache




def other_pass(gm, ctx):
    return PassResult()


def _inputs(n=4):
    return torch.arange(n * 8, dtype=torch.float32).reshape(n, 8) / 10, torch.arange(n)


def compile_once(cache, model_cls=Tiny, inputs=None, **kwargs):
    """A fresh Dynamo and Backend compile ``model_cls`` once; returns (backend, its one cache event); the output
    and the buffer it wrote equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, eager = model_cls().eval(), model_cls().eval()
    eager.load_state_dict(model.state_dict())
    inputs = inputs or _inputs()
    backend = fxpasses.Backend(cache=cache, **kwargs)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*inputs)
        torch.testing.assert_close(out, eager(*inputs), rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.named_buffers(), eager.named_buffers()):
        assert torch.equal(a, b), f"buffer {name} differs from eager"
    assert len(backend.cache_events) == 1
    return backend, backend.cache_events[0]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def test_hit_in_a_new_backend_replays_the_report(tmp_path):
    first, miss = compile_once(tmp_path, patterns=[double_to_add])
    assert not miss.hit and miss.stored and "no entry for this key" in miss.reason
    second, hit = compile_once(tmp_path, patterns=[double_to_add])
    assert hit.hit and hit.key == miss.key
    assert second.report.matches == first.report.matches == {"double_to_add": 1}
    assert "compile cache: graph 0 hit" in str(second.report)


def test_miss_after_each_change(tmp_path):
    """Mapping (rank and layout), pattern set, user pass (another one, or the same one edited), config: new keys."""
    _, base = compile_once(tmp_path, patterns=[double_to_add])

    def edited_pass(gm, ctx, factor=2):
        return double_to_add(gm, ctx)

    def edited_pass_2(gm, ctx, factor=3):  # the same code with another default: behaves differently
        return double_to_add(gm, ctx)

    variants = {
        "rank": dict(mapping=fxpasses.Mapping(2, 1, 2, 1)),
        "layout": dict(mapping=fxpasses.Mapping(2, 0, 1, 2)),
        "pattern set": dict(patterns=[double_to_add, "rms_norm"]),
        "user pass added": dict(extra_passes=[other_pass]),
        "user pass": dict(extra_passes=[edited_pass]),
        "user pass edited": dict(extra_passes=[edited_pass_2]),
        "config": dict(strict=True),
    }
    keys = {base.key}
    for what, kwargs in variants.items():
        kwargs.setdefault("patterns", [double_to_add])
        _, event = compile_once(tmp_path, **kwargs)
        assert not event.hit and event.stored, what
        assert event.key not in keys, f"{what}: same key as an earlier variant"
        keys.add(event.key)
    _, again = compile_once(tmp_path, patterns=[double_to_add])
    assert again.hit and again.key == base.key


def test_key_covers_torch_version_and_our_code(tmp_path):
    """A new torch or an edit of fxpasses is a new key (simulated on the key function: neither can change here)."""
    backend, event = compile_once(tmp_path, patterns=[double_to_add])
    identity = backend.cache_identity()
    assert identity["torch"] == torch.__version__ and identity["code"]
    graph = {"code": "graph"}
    state = cache_key.global_state()
    base = cache_key.graph_key(identity, graph, state, False)
    assert cache_key.graph_key(dict(identity, torch="2.11.0"), graph, state, False) != base
    assert cache_key.graph_key(dict(identity, code="edited"), graph, state, False) != base
    assert cache_key.graph_key(identity, {"code": "another graph"}, state, False) != base
    assert cache_key.graph_key(identity, graph, dict(state, grad=not state["grad"]), False) != base


def test_a_pattern_plugins_source_is_in_the_key(tmp_path, monkeypatch):
    """Patterns are keyed by their source files, not their traces: editing a file of the package defining a
    pattern's function changes its identity."""
    package = tmp_path / "my_cache_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("SCALE = 2\n")
    (package / "passes.py").write_text("from my_cache_plugin.helpers import SCALE\n\ndef my_pass(gm, ctx):\n"
                                       "    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_cache_plugin.passes import my_pass

    before = cache_key.callable_identity(my_pass, "my_pass")
    (package / "helpers.py").write_text("SCALE = 3  # edited\n")
    assert cache_key.callable_identity(my_pass, "my_pass") != before


def test_corrupt_or_truncated_entry_is_a_miss_and_is_rewritten(tmp_path):
    _, first = compile_once(tmp_path, patterns=[double_to_add])
    path = CacheStore(tmp_path).path(first.key)
    blob = path.read_bytes()
    for broken in (blob[: len(blob) // 2], blob[:-10] + b"0123456789", b"", b"not an entry"):
        path.write_bytes(broken)
        _, event = compile_once(tmp_path, patterns=[double_to_add])
        assert not event.hit and event.stored, broken[:20]
        assert ("corrupt" in event.reason) or ("does not load" in event.reason), event.reason
        assert CacheStore(tmp_path).load(first.key)[0] is not None, "the miss rewrote the entry"
    _, event = compile_once(tmp_path, patterns=[double_to_add])
    assert event.hit


def test_refused_graphs_are_compiled_every_time(tmp_path):
    """An output that aliases an input needs AOT's runtime wrapper to regenerate the view: never cached."""

    class Aliasing(torch.nn.Module):
        def forward(self, x, slots):
            return x.view(-1), x.relu()

    for _ in range(2):
        _, event = compile_once(tmp_path, model_cls=Aliasing, patterns=[double_to_add])
        assert not event.hit and not event.stored
        assert "not stored: an output aliases an input" in event.reason
    assert not list(tmp_path.rglob("*.entry"))


def test_stateful_pass_without_uuid_is_not_cached(tmp_path):
    class Counting:
        def __init__(self):
            self.lock = __import__("threading").Lock()  # state the key cannot capture

        def __call__(self, gm, ctx):
            return PassResult()

    _, event = compile_once(tmp_path, patterns=[double_to_add], extra_passes=[Counting()])
    assert not event.hit and event.key is None and "uuid()" in event.reason

    class WithUuid(Counting):
        def uuid(self):
            return "counting-v1"

    _, event = compile_once(tmp_path, patterns=[double_to_add], extra_passes=[WithUuid()])
    assert event.stored
    _, event = compile_once(tmp_path, patterns=[double_to_add], extra_passes=[WithUuid()])
    assert event.hit


def test_cache_off(tmp_path, monkeypatch):
    backend, event = compile_once(False, patterns=[double_to_add])
    assert backend.cache is None and not event.hit and "off" in event.reason
    monkeypatch.setenv("FXPASSES_CACHE", "0")
    monkeypatch.setenv("FXPASSES_CACHE_DIR", str(tmp_path))
    backend, event = compile_once(None, patterns=[double_to_add])
    assert backend.cache is None and "off" in event.reason
    assert not list(tmp_path.rglob("*")), "nothing written with the cache off"


def test_location_option_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FXPASSES_CACHE", raising=False)
    monkeypatch.delenv("FXPASSES_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fxpasses"
    assert resolve_cache_dir(None) == resolve_cache_dir(True) == tmp_path / "xdg" / "fxpasses"
    monkeypatch.setenv("FXPASSES_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "opt")) == tmp_path / "opt"
    with pytest.raises(TypeError, match="cache must be True, False or a directory"):
        fxpasses.Backend(cache=3)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        fxpasses.Backend(cache=tmp_path / "file")


def test_inductor_path_keeps_inductors_cache(tmp_path):
    backend = fxpasses.Backend(inductor=True, cache=tmp_path, patterns=[double_to_add])
    assert backend.cache is None  # Inductor's FX-graph cache serves it, our uuid() in its key


# ---- two processes writing the same key at once ----------------------------------------------------------------
def _compile_on_rank(rank, world_size, cache_dir):
    """Both ranks compile the same model with the same (single-rank) Backend, so the same key, at the same time."""
    dist.barrier()
    backend, event = compile_once(cache_dir, patterns=[double_to_add])
    dist.barrier()
    _, after = compile_once(cache_dir, patterns=[double_to_add])
    return dataclasses.asdict(event), dataclasses.asdict(after)


def test_concurrent_writers_of_one_key(tmp_path):
    """Two ranks compile the same graph at once (both miss and write one key), then the entry serves both; two
    ranks store and load one 1 MiB entry 100 times each: every load is the whole entry."""
    payload = os.urandom(1 << 20)
    with RankPool(2) as pool:
        results = pool.run(_compile_on_rank, str(tmp_path / "compile"))
        hammered = pool.run(_hammer, str(tmp_path / "store"), payload)
    assert all(seen == [payload] for seen in hammered)
    tmp_path = tmp_path / "compile"
    firsts = [first for first, _ in results]
    assert len({e["key"] for e in firsts}) == 1
    assert all(e["stored"] or e["hit"] for e in firsts)
    assert all(after["hit"] for _, after in results), "after both wrote, the entry serves both"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{firsts[0]['key']}.entry"], \
        "no temporary file is left behind"


def _hammer(rank, world_size, cache_dir, payload):
    """Store one entry 100 times while loading it: every load is the whole entry or none."""
    from fxpasses.compile_cache import GraphEntry, ReportDelta

    store = CacheStore(Path(cache_dir))
    entry = GraphEntry(key="ab" * 32, graph=payload, has_values=False, mutated_inputs=(),
                       dynamic_output_dims=(), report=ReportDelta(), torch_version=torch.__version__)
    dist.barrier()
    seen = set()
    for _ in range(100):
        assert store.store(entry) is None
        loaded, reason = store.load(entry.key)
        assert loaded is not None, reason
        seen.add(loaded.graph)
    return sorted(seen)


@pytest.mark.gpu
def test_cuda_graphs_hit_equals_eager(tmp_path):
    from fxpasses.models import LlamaConfig, build_model, make_steps, run_steps

    config = dataclasses.replace(LlamaConfig(), num_layers=2)
    steps = [dataclasses.replace(s, **{f: getattr(s, f).cuda() for f in ("input_ids", "position_ids", "slot_ids")})
             for s in make_steps(config.vocab_size, decode_steps=2)]
    with torch.device("cuda"):
        eager = run_steps(build_model("llama", config), steps)
    events, runs = [], []
    for _ in range(2):
        torch._dynamo.reset()
        with torch.device("cuda"):
            model = build_model("llama", config)
        backend = fxpasses.Backend(cache=tmp_path, cuda_graph_sizes=[1, 2, 4, 8, 16])
        outs = [o.clone() for o in run_steps(model, steps, torch.compile(model, backend=backend))]
        for a, b in zip(outs, eager):  # fused Triton kernels are not bit-equal to eager's ops on GPU, even in fp32
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        events.append([e.hit for e in backend.cache_events])
        runs.append(outs)
    assert events == [[False], [True]]
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "the hit runs the same graph and kernels as the miss"
