"""Models parallelized with torch's own engine fuse as ours do: a 2-layer transformers Llama with TP2 built by
``parallelize_module`` on ``init_device_mesh``, on a mesh made from existing groups, and by transformers' own TP
plan (in-place ``dist.all_reduce``) fuses 4 allreduce+add+RMSNorm and 1 RMSNorm on every rank, with logits equal
to the unparallelized eager model. The fake process group (world 8) checks the structure of every TP x PP split;
real gloo ranks check the numbers."""
import pytest
import torch
import torch.distributed as dist

import fxpasses
from fxpasses.testing import RankPool, RecordingBackend, fake_process_group

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

LAYERS = 2
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
FUSED = {"allreduce_add_rms_norm": 2 * LAYERS, "rms_norm": 1}  # the first norm has no residual add before it
TOL = dict(rtol=1e-4, atol=1e-4)


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def token_ids() -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))


def torch_tp_plan() -> dict:
    """A torchtitan-style plan for transformers' Llama: attention and MLP in, column-wise; out, row-wise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel(), RowwiseParallel()
    return {"model.layers.*.self_attn.q_proj": col, "model.layers.*.self_attn.k_proj": col,
            "model.layers.*.self_attn.v_proj": col, "model.layers.*.self_attn.o_proj": row,
            "model.layers.*.mlp.gate_proj": col, "model.layers.*.mlp.up_proj": col, "model.layers.*.mlp.down_proj": row}


def parallelize(model: torch.nn.Module, route: str, mapping: fxpasses.Mapping | None = None):
    """Tensor-parallelize ``model`` by ``route``; return the TP mesh."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    if route == "from_group":  # fxpasses made the groups; torch's mesh adopts them
        mesh = DeviceMesh.from_group(fxpasses.init_process_groups(mapping).tp, "cpu")
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if route == "transformers":  # transformers' own TP plan: RowwiseParallel's inference path is dist.all_reduce
        from transformers.distributed.tensor_parallel import apply_tensor_parallelism

        apply_tensor_parallelism(model, mesh, model._expand_parallel_plan(model._tp_plan))
    else:
        parallelize_module(model, mesh, torch_tp_plan())
    return mesh


def compile_tp(model: torch.nn.Module, mapping: fxpasses.Mapping):
    backend = RecordingBackend(mapping)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend=backend, fullgraph=True)(token_ids()).logits
    return logits, backend


def tp_route(rank: int, world_size: int, route: str):
    """On one gloo rank: parallelize the Llama by ``route``, compile it, return (logits, matches, fused ops)."""
    model = llama()
    mapping = fxpasses.Mapping(world_size, rank, world_size, 1)
    mesh = parallelize(model, route, mapping)
    assert fxpasses.Mapping.from_device_mesh(mesh) == mapping
    logits, backend = compile_tp(model, mapping)
    after = backend.after
    return (logits, dict(backend.report.matches), {k: v for k, v in after.items() if k.startswith(("fxp.", "_c10d"))},
            [m.reason for m in backend.report.near_misses])


@pytest.fixture(scope="module")
def pool2():
    with RankPool(2, timeout=300) as pool:
        yield pool


@pytest.fixture(scope="module")
def reference():
    with torch.no_grad():
        return llama()(token_ids()).logits


@pytest.mark.multirank
@pytest.mark.parametrize("route", ["parallelize_module", "from_group", "transformers"])
def test_tp2_routes_fuse_and_match_eager(pool2, reference, route):
    for rank, (logits, matches, ops, misses) in enumerate(pool2.run(tp_route, route)):
        assert {k: matches.get(k, 0) for k in FUSED} == FUSED, (rank, matches)
        assert ops["fxp.allreduce_add_rms_norm"] == 2 * LAYERS and ops["fxp.rms_norm"] == 1
        # what is left unfused: transformers' vocab-parallel embedding all-reduces into a norm with no residual add
        assert ops.get("_c10d_functional.all_reduce", 0) == (1 if route == "transformers" else 0), ops
        if route == "transformers":
            assert len(misses) == 1 and "is not added to a residual" in misses[0], misses
        torch.testing.assert_close(logits, reference, **TOL)


@pytest.mark.parametrize("tp, pp, rank", [(8, 1, 7), (4, 2, 5), (2, 4, 3), (1, 8, 6)])
def test_every_split_of_eight_fuses_on_a_2d_mesh(tp, pp, rank):
    """A 2-D ("pp", "tp") mesh makes groups of its own; their names are not fxpasses', their ranks are. (One rank
    per split keeps it fast: each compile of a DTensor model takes seconds.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    with fake_process_group(8, rank):
        mesh = init_device_mesh("cpu", (pp, tp), mesh_dim_names=("pp", "tp"))
        mapping = fxpasses.Mapping.from_device_mesh(mesh, tp_dim="tp", pp_dim="pp")
        assert mapping == fxpasses.Mapping(8, rank, tp, pp)
        assert mesh.get_group("tp").group_name != fxpasses.init_process_groups(mapping).tp.group_name
        model = llama()
        if tp > 1:
            parallelize_module(model, mesh["tp"], torch_tp_plan())
        _, backend = compile_tp(model, mapping)
    if tp > 1:
        assert backend.report.matches.get("allreduce_add_rms_norm") == 2 * LAYERS
        assert backend.report.matches.get("rms_norm") == 1
        assert backend.after["fxp.allreduce_add_rms_norm"] == 2 * LAYERS
        assert "_c10d_functional.all_reduce" not in backend.after
    else:
        assert backend.report.matches.get("add_rms_norm") == 2 * LAYERS


def test_group_with_other_ranks_is_a_near_miss_naming_the_fix():
    """A mesh whose TP dimension is first puts TP ranks 4 apart; a (tp=2, pp=4) Mapping expects them adjacent."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    with fake_process_group(8, 0):
        mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("tp", "pp"))
        with pytest.raises(ValueError, match="Build the mesh with the TP dimension last"):
            fxpasses.Mapping.from_device_mesh(mesh, tp_dim="tp", pp_dim="pp")
        model = llama()
        parallelize_module(model, mesh["tp"], torch_tp_plan())
        _, backend = compile_tp(model, fxpasses.Mapping(8, 0, 2, 4))
    assert "allreduce_add_rms_norm" not in backend.report.matches
    assert backend.report.matches.get("add_rms_norm") == 2 * LAYERS  # the add and norm still fuse, unreduced
    misses = [m for m in backend.report.near_misses if m.pattern == "allreduce_add_rms_norm"]
    assert len(misses) == 2 * LAYERS
    assert all("(ranks [0, 4])" in m.reason and "TP group (ranks [0, 1]" in m.reason
               and "Mapping.from_device_mesh" in m.reason for m in misses), misses[0].reason


def test_inplace_all_reduce_of_a_graph_input_keeps_the_write():
    """``dist.all_reduce(x)`` on an input: the copy back into x stays (the caller sees x reduced), and the result
    still fuses with the add and norm."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)

        def forward(self, x, residual):
            dist.all_reduce(x)
            h = x + residual
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight, h

    mapping = fxpasses.Mapping(2, 0, 2, 1)
    x, residual = torch.randn(4, 16), torch.randn(4, 16)
    with fake_process_group(2, 0):
        model = Block().eval()
        backend = RecordingBackend(mapping)
        torch._dynamo.reset()
        xc = x.clone()
        with torch.no_grad():
            out, h = torch.compile(model, backend=backend)(xc, residual)
            xe = x.clone()
            ref, ref_h = model(xe, residual)
    # the fake all_reduce returns its input: the reduced x equals x, and must still be written back (same values)
    assert torch.equal(xc, xe)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(h, ref_h, **TOL)
    assert backend.after["aten.copy_"] == 1  # the input mutation is kept


def test_inplace_all_reduce_into_a_buffer_read_later_keeps_both_values():
    """The buffer's value before the collective is read after it (``before``, a clone): the canonicalized graph still
    gives it, and the all_reduce fuses. A read of the reduced value elsewhere blocks the fusion instead (the fused
    op does not return the reduced value alone), with a near miss naming that reader."""

    class Block(torch.nn.Module):
        def __init__(self, reads_reduced: bool):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)
            self.reads_reduced = reads_reduced

        def forward(self, a, residual):
            y = a * 2
            before = y.clone()
            dist.all_reduce(y)
            h = y.view(2, 2, 16).view(4, 16) + residual
            extra = before + y if self.reads_reduced else before - a
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight, h, extra

    mapping = fxpasses.Mapping(2, 1, 2, 1)
    a, residual = torch.randn(4, 16), torch.randn(4, 16)
    for reads_reduced in (False, True):
        with fake_process_group(2, 1):
            model = Block(reads_reduced).eval()
            backend = RecordingBackend(mapping)
            torch._dynamo.reset()
            with torch.no_grad():
                got = torch.compile(model, backend=backend)(a, residual)
                ref = model(a, residual)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, **TOL)
        assert backend.before["aten.copy"] == 1 and "aten.copy" not in backend.after
        if not reads_reduced:
            assert backend.report.matches == {"allreduce_add_rms_norm": 1}
        else:
            assert backend.report.matches == {"add_rms_norm": 1}
            (miss,) = backend.report.near_misses
            assert "wait_tensor" in miss.reason and "has another user" in miss.reason, miss.reason


# ---- torch's compiled point-to-point (torch 2.13: enable_p2p_compilation) ------------------------------------------
def compiled_p2p(rank: int, world_size: int, sizes: tuple[int, ...]):
    """Rank 0 sends twice; rank 1 receives once into a buffer nobody reads (it must still arrive, exactly once: the
    sends would otherwise wait forever) and once into a buffer it reads. Dynamic sizes: one graph serves each size."""
    from fxpasses import compat

    def step(x):
        if rank == 0:
            first = dist.isend(x * 2, dst=1)
            first.wait()
            second = dist.isend(x + 10, dst=1)
            second.wait()
            return x + 1
        dead = torch.empty_like(x)
        dist.irecv(dead, src=0).wait()
        buf = torch.empty_like(x)
        before = buf.sum() * 0  # a read of the buffer before the receive: must not see the received values
        dist.irecv(buf, src=0).wait()
        return buf * 3 + before

    backend = RecordingBackend(fxpasses.Mapping(world_size, rank, 1, world_size))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, dynamic=True)
    outs = []
    with compat.p2p_compilation(), torch.no_grad():
        for n in sizes:
            outs.append(compiled(torch.arange(float(n))))
    return outs, len(backend.records), [dict(r.after) for r in backend.records], [r.error for r in backend.report.errors]


@pytest.mark.multirank
@pytest.mark.skipif(fxpasses.compat.p2p_compilation() is None, reason="this torch cannot compile dist.isend/irecv")
def test_compiled_isend_irecv_are_kept_once_and_in_order(pool2):
    sizes = (4, 6, 9)
    (outs0, graphs0, after0, errors0), (outs1, graphs1, after1, errors1) = pool2.run(compiled_p2p, sizes)
    assert errors0 == [] and errors1 == []
    assert graphs0 == graphs1 == 1  # dynamic sizes: one graph each
    assert after0[0]["_c10d_functional.isend"] == 2 and after1[0]["_c10d_functional.irecv"] == 2
    for n, o0, o1 in zip(sizes, outs0, outs1):
        x = torch.arange(float(n))
        assert torch.equal(o0, x + 1)
        assert torch.equal(o1, (x + 10) * 3)  # the second send, not the first: order kept


@pytest.mark.skipif(fxpasses.compat.p2p_compilation() is None, reason="this torch cannot compile dist.isend/irecv")
def test_compiled_irecv_writes_its_buffer_for_every_pass():
    """irecv's schema declares no write, but it fills its buffer: a read before it and the same read after it are two
    values (CSE must not merge them), and a receive into a buffer nobody reads is kept (DCE)."""
    from fxpasses import compat

    def step(x):
        dead = torch.empty_like(x)
        dist.irecv(dead, src=0).wait()
        buf = x * 1
        before = buf.sum()
        dist.irecv(buf, src=0).wait()
        return before, buf.sum()

    with fake_process_group(2, 1):
        backend = RecordingBackend(fxpasses.Mapping(2, 1, 1, 2))
        torch._dynamo.reset()
        with compat.p2p_compilation(), torch.no_grad():
            torch.compile(step, backend=backend, fullgraph=True)(torch.arange(4.0))
    after = backend.after
    assert after["_c10d_functional.irecv"] == 2
    assert after["_c10d_functional.wait_tensor"] == backend.before["_c10d_functional.wait_tensor"] == 4
    assert after["aten.sum"] == 2, backend.records[-1].code_after
    assert backend.report.errors == []


def test_with_effects_collective_is_a_collective():
    """Ops registered as effectful reach graphs as ``with_effects(token, op, ...)``: the effect analysis sees the
    collective inside, with its group, and dead-code elimination keeps it."""
    from functorch.compile import aot_function, make_boxed_func

    from fxpasses import effects
    from fxpasses.patterns.matcher import PatternTraceError, trace_pattern

    op = torch.ops._c10d_functional.all_reduce.default
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch.library._register_effectful_op(op, torch.library.EffectType.ORDERED)
    try:
        with fake_process_group(2, 0) as world, torch.no_grad():
            name = world.group_name
            aot_function(lambda x: torch.ops._c10d_functional.wait_tensor(op(x, "sum", name)) + 1,
                         fw_compiler=capture)(torch.randn(4))
        # a pattern spelled with an effectful op cannot be traced into a matchable graph: refused clearly, not a crash
        with pytest.raises(PatternTraceError, match="effect token"):
            trace_pattern(lambda x: torch.ops._c10d_functional.wait_tensor(op(x, "sum", "g")),
                          (torch.empty(4, device="meta"),), ("x",))
    finally:
        torch.library._register_effectful_op(op, None)  # all_reduce's default: no effect token
    (node,) = [n for n in graphs[0].graph.nodes if effects.is_with_effects(n)]
    assert effects.underlying_op(node) is op and effects.is_impure(node)
    assert effects.effect_signature(graphs[0].graph)[0] == [("comm", "all_reduce", name)]


# ---- torch.distributed.pipelining: each stage one graph, compiled with our Backend --------------------------------
class LlamaStage(torch.nn.Module):
    """Layers ``layers`` of a transformers Llama as one pipeline stage: the first stage embeds the token ids, the
    last applies the final norm and the LM head. Stages hand each other the hidden state."""

    def __init__(self, model: torch.nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        inner = model.model
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = torch.nn.ModuleList(inner.layers[i] for i in layers)
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x):
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        cos_sin = self.rotary_emb(h, positions)
        for layer in self.layers:
            h = layer(h, position_ids=positions, position_embeddings=cos_sin)
            h = h[0] if isinstance(h, tuple) else h
        return self.lm_head(self.norm(h)) if self.lm_head is not None else h


def stage_tp_plan() -> dict:
    return {k.removeprefix("model."): v for k, v in torch_tp_plan().items()}


class HandoffStage(torch.nn.Module):
    """A pipeline stage of HandoffBlocks: stages hand each other ``(partial, residual)``, the last MLP's partial sum
    unreduced, so the receiving stage all-reduces it on its own TP group (the same sum) and fuses
    all_reduce+add+RMSNorm; without TP (``mesh`` None) the partial is the whole value and the add fuses with the norm."""

    def __init__(self, model: torch.nn.Module, layers: range, first: bool, last: bool, mesh):
        super().__init__()
        inner = model.model
        self.embed_tokens = inner.embed_tokens if first else None
        self.blocks = torch.nn.ModuleList(HandoffBlock(inner.layers[i], mesh) for i in layers)
        self.rotary_emb = inner.rotary_emb
        self.head = HandoffHead(model, mesh) if last else None

    def forward(self, *args):
        partial, residual = (None, self.embed_tokens(args[0])) if self.embed_tokens is not None else args
        cos, sin = self.rotary_emb(residual, torch.arange(residual.shape[1]).unsqueeze(0))
        for block in self.blocks:
            partial, residual = block(partial, residual, cos, sin)
        return self.head(partial, residual) if self.head is not None else (partial, residual)


def pipelined(rank: int, world_size: int, tp: int, microbatches: int, handoff: bool = False):
    """One rank of a TP x PP run: a ("pp", "tp") mesh, DTensor TP inside each stage; the compiled stage runs under
    GPipe, then under 1F1B (one compile serves both). ``handoff``: stages of HandoffBlocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torch.distributed.tensor.parallel import parallelize_module

    pp = world_size // tp
    mesh = init_device_mesh("cpu", (pp, tp), mesh_dim_names=("pp", "tp"))
    mapping = fxpasses.Mapping.from_device_mesh(mesh, tp_dim="tp", pp_dim="pp")
    where = (mapping.pp_layers(LAYERS), mapping.is_first_pp_rank, mapping.is_last_pp_rank)
    plan = stage_tp_plan()
    if handoff:
        from torch.distributed.tensor import Partial
        from torch.distributed.tensor.parallel import RowwiseParallel

        stage = HandoffStage(llama(), *where, mesh["tp"] if tp > 1 else None)
        plan = {k.replace("layers.", "blocks.").replace(".self_attn", ".layer.self_attn").replace(".mlp", ".layer.mlp"): v
                for k, v in plan.items()}
        plan["blocks.*.layer.mlp.down_proj"] = RowwiseParallel(output_layouts=Partial())
    else:
        stage = LlamaStage(llama(), *where)
    if tp > 1:
        parallelize_module(stage, mesh["tp"], plan)
    backend = RecordingBackend(mapping)
    torch._dynamo.reset()
    compiled = torch.compile(stage, backend=backend, fullgraph=True)
    ids = torch.randint(0, CONFIG["vocab_size"], (microbatches, 7), generator=torch.Generator().manual_seed(2))
    outs = []
    for schedule in (ScheduleGPipe, Schedule1F1B):
        pipe = PipelineStage(compiled, mapping.pp_rank, pp, torch.device("cpu"), group=mesh.get_group("pp"))
        run = schedule(pipe, n_microbatches=microbatches)
        with torch.no_grad():
            out = run.eval(ids) if mapping.is_first_pp_rank else run.eval()
        outs.append(out if mapping.is_last_pp_rank else None)
    after = backend.after
    return (outs, len(backend.records), dict(backend.report.matches),
            {k: v for k, v in after.items() if k.startswith(("fxp.", "_c10d"))})


def pipeline_reference(microbatches: int) -> torch.Tensor:
    ids = torch.randint(0, CONFIG["vocab_size"], (microbatches, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return llama()(ids).logits


# Per stage, with the boundary after layer 0's last residual add (as transformers' layers are written): the first
# stage fuses its first norm and the attention's add+norm; its MLP's add is the stage's output (no norm after it
# in this graph). The second stage normalizes what it received, then fuses both add+norms (the last, the final norm).
STAGE_FUSED_PP = [{"rms_norm": 1, "add_rms_norm": 1}, {"rms_norm": 1, "add_rms_norm": 2}]
# Stages handing (partial, residual) on: the second stage reduces, adds and normalizes what it received in one op.
STAGE_FUSED_HANDOFF = [{"rms_norm": 1, "allreduce_add_rms_norm": 1}, {"rms_norm": 0, "allreduce_add_rms_norm": 3}]


@pytest.mark.multirank
def test_pp2_pipelining_gpipe_and_1f1b(pool2):
    microbatches = 4
    results = pool2.run(pipelined, 1, microbatches)
    for rank, (_, graphs, matches, _) in enumerate(results):
        assert graphs == 1, f"rank {rank}: one graph must serve every microbatch of both schedules"
        assert {k: matches.get(k, 0) for k in STAGE_FUSED_PP[rank]} == STAGE_FUSED_PP[rank], (rank, matches)
    reference = pipeline_reference(microbatches)
    for logits in results[-1][0]:  # GPipe's, then 1F1B's
        torch.testing.assert_close(logits, reference, **TOL)


@pytest.fixture(scope="module")
def pool4():
    with RankPool(4, timeout=300) as pool:
        yield pool


@pytest.mark.multirank
def test_tp2_pp2_dtensor_inside_pipelining_stages(pool4):
    """Stages handing (partial, residual) on: 4 allreduce+add+RMSNorm and 1 RMSNorm on every TP rank's pipeline,
    nothing left unfused, as in one whole-model graph."""
    microbatches = 2
    results = pool4.run(pipelined, 2, microbatches, True)
    reference = pipeline_reference(microbatches)
    for rank, (outs, graphs, matches, ops) in enumerate(results):
        expected = STAGE_FUSED_HANDOFF[rank // 2]
        assert graphs == 1
        assert {k: matches.get(k, 0) for k in expected} == expected, (rank, matches)
        assert "_c10d_functional.all_reduce" not in ops, (rank, ops)
        for logits in outs if rank >= 2 else ():
            torch.testing.assert_close(logits, reference, **TOL)


# ---- per-block compile (torchtitan's apply_compile) ------------------------------------------------------------------
class HandoffBlock(torch.nn.Module):
    """A transformers decoder layer that hands ``(partial, residual)`` to the next block: its MLP output stays a
    partial sum (down_proj planned ``RowwiseParallel(output_layouts=Partial())``), and the next block all-reduces it,
    adds the residual and normalizes, all in one graph, so that all_reduce+add+RMSNorm fuses across the block
    boundary. The first block receives the embedding itself (``partial`` is None)."""

    def __init__(self, layer: torch.nn.Module, mesh):
        super().__init__()
        self.layer, self.mesh = layer, mesh

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Replicate

        return DTensor.from_local(partial, self.mesh, [Partial()]).redistribute(self.mesh, [Replicate()]).to_local()

    def forward(self, partial, residual, cos, sin):
        h = residual if partial is None else self.reduce(partial) + residual
        x = self.layer.self_attn(self.layer.input_layernorm(h), position_embeddings=(cos, sin), attention_mask=None)[0]
        h = h + x
        return self.layer.mlp(self.layer.post_attention_layernorm(h)), h


class HandoffHead(HandoffBlock):
    """The last block's partial, reduced and added, then the final norm and the LM head."""

    def __init__(self, model: torch.nn.Module, mesh):
        torch.nn.Module.__init__(self)
        self.norm, self.lm_head, self.mesh = model.model.norm, model.lm_head, mesh

    def forward(self, partial, residual):
        return self.lm_head(self.norm(self.reduce(partial) + residual))


def per_block(rank: int, world_size: int, handoff: bool):
    """TP2, each block compiled on its own (torchtitan's apply_compile): as transformers wrote the blocks, or as
    blocks that hand (partial, residual) to the next one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    model, mesh = llama(), init_device_mesh("cpu", (world_size,))
    plan = torch_tp_plan()
    if handoff:
        plan["model.layers.*.mlp.down_proj"] = RowwiseParallel(output_layouts=Partial())
    parallelize_module(model, mesh, plan)
    backend = RecordingBackend(fxpasses.Mapping.from_device_mesh(mesh))
    torch._dynamo.reset()
    ids = token_ids()
    with torch.no_grad():
        if not handoff:
            for i, layer in enumerate(model.model.layers):  # apply_compile
                model.model.layers.register_module(str(i), torch.compile(layer, backend=backend, fullgraph=True))
            logits = model(ids).logits
        else:
            inner = model.model
            blocks = [torch.compile(HandoffBlock(layer, mesh), backend=backend, fullgraph=True) for layer in inner.layers]
            head = torch.compile(HandoffHead(model, mesh), backend=backend, fullgraph=True)
            h = inner.embed_tokens(ids)
            cos, sin = inner.rotary_emb(h, torch.arange(ids.shape[1]).unsqueeze(0))
            partial, residual = None, h
            for block in blocks:
                partial, residual = block(partial, residual, cos, sin)
            logits = head(partial, residual)
    graphs = [{k: v for k, v in r.after.items() if k in ("fxp.allreduce_add_rms_norm", "fxp.rms_norm",
                                                            "_c10d_functional.all_reduce")} for r in backend.records]
    return logits, graphs


@pytest.mark.multirank
def test_per_block_compile_as_written_and_with_handoff(pool2, reference):
    # as written: each block's graph fuses its attention all_reduce+add+norm; its MLP all_reduce+add feeds the next
    # block's norm in another graph (and the final norm runs outside every graph): one graph per block.
    for logits, graphs in pool2.run(per_block, False):
        assert graphs == LAYERS * [{"fxp.allreduce_add_rms_norm": 1, "fxp.rms_norm": 1, "_c10d_functional.all_reduce": 1}]
        torch.testing.assert_close(logits, reference, **TOL)
    # handing (partial, residual) on: every all_reduce fuses, 4 + 1 over the graphs as in one whole-model graph
    for logits, graphs in pool2.run(per_block, True):
        assert graphs == [{"fxp.allreduce_add_rms_norm": 1, "fxp.rms_norm": 1},  # block 0: receives the embedding
                          {"fxp.allreduce_add_rms_norm": 2},  # block 1
                          {"fxp.allreduce_add_rms_norm": 1}], graphs  # head: final norm
        torch.testing.assert_close(logits, reference, **TOL)


@pytest.mark.parametrize("tp, pp", [(2, 2), (4, 1)])
def test_fp8_variant_fuses_on_a_mesh_group(tp, pp):
    """The fp8 form checks its group the same way: a 2-D mesh's TP group, never registered with fxpasses, fuses
    (and a (tp=4, pp=1) mesh's whole-world group does too); the fused op computes the model's exact fp8 bits."""
    from torch.distributed.device_mesh import init_device_mesh

    from pattern_helpers import compile_and_capture
    from test_patterns_tp_fp8 import RowParallelBlock, fp8_bits

    rank = 3
    with fake_process_group(4, rank):
        mesh = init_device_mesh("cpu", (pp, tp), mesh_dim_names=("pp", "tp"))
        mapping = fxpasses.Mapping.from_device_mesh(mesh, tp_dim="tp", pp_dim="pp")
        model = RowParallelBlock(16, mesh.get_group("tp").group_name, dtype=torch.bfloat16, fp8=True).eval()
        args = (torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16))
        (q, r), backend, _, after = compile_and_capture(model, args, mapping=mapping)
        with torch.no_grad():
            ref_q, ref_r = model(*args)
    assert backend.report.matches == {"allreduce_add_rms_norm_quant_fp8": 1}
    assert after["fxp.allreduce_add_rms_norm_quant_fp8"] == 1 and "_c10d_functional.all_reduce" not in after
    assert torch.equal(fp8_bits(q), fp8_bits(ref_q)) and torch.equal(r, ref_r)
