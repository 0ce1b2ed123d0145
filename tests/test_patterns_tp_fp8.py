"""Mapping-aware allreduce fusion under the fake process group, and the fp8-quantized variants."""
import pytest
import torch
from torch.distributed import _functional_collectives as funcol

import fxpasses
from fxpasses.testing import fake_process_group
from pattern_helpers import compile_and_capture
from test_patterns_norm import data, hf_norm


def quant(x, scale):
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


class RowParallelBlock(torch.nn.Module):
    """A row-parallel projection, all-reduced on ``group``, then residual add and RMSNorm (optionally fp8)."""

    def __init__(self, d, group, dtype=torch.float32, fp8=False):
        super().__init__()
        self.group, self.fp8 = group, fp8
        self.proj = torch.nn.Linear(d, d, bias=False, dtype=dtype)
        self.norm = torch.nn.Parameter(torch.rand(d, dtype=dtype) + 0.5)
        self.register_buffer("scale", torch.tensor(0.05))

    def forward(self, x, residual):
        y = funcol.all_reduce(self.proj(x), "sum", self.group)
        r = y + residual
        out = hf_norm(r, self.norm, 1e-6)
        return (quant(out, self.scale) if self.fp8 else out), r


SPLITS = [(8, 1), (4, 2), (2, 4), (1, 8)]


@pytest.mark.parametrize("tp, pp", SPLITS)
def test_allreduce_fuses_only_on_the_tp_group(tp, pp):
    for rank in range(8):
        m = fxpasses.Mapping(world_size=8, rank=rank, tp_size=tp, pp_size=pp)
        with fake_process_group(8, rank):
            groups = fxpasses.init_process_groups(m)
            args = (data(4, 16), data(4, 16, seed=1))
            _, on_tp, _, after = compile_and_capture(RowParallelBlock(16, groups.tp.group_name).eval(), args, mapping=m)
            _, on_pp, _, after_pp = compile_and_capture(RowParallelBlock(16, groups.pp.group_name).eval(), args, mapping=m)
        if tp > 1:
            assert on_tp.report.matches == {"allreduce_add_rms_norm": 1}, (rank, on_tp.report.matches)
            assert after["fxp.allreduce_add_rms_norm"] == 1 and "_c10d_functional.all_reduce" not in after
        else:  # tp=1 never produces the fused allreduce op; the add and norm still fuse
            assert on_tp.report.matches == {"add_rms_norm": 1}
            assert "fxp.allreduce_add_rms_norm" not in after
            (miss,) = on_tp.report.near_misses
            assert "the pattern is off for this configuration (needs mapping.tp_size > 1)" in miss.reason
        # the same block all-reduced on the PP group: never the allreduce fusion, add+norm still fuse
        assert on_pp.report.matches == {"add_rms_norm": 1}
        assert after_pp["_c10d_functional.all_reduce"] == 1 and "fxp.allreduce_add_rms_norm" not in after_pp
        if tp > 1:
            (miss,) = on_pp.report.near_misses
            assert miss.pattern == "allreduce_add_rms_norm"
            assert miss.reason.startswith(f"the all_reduce is on group {groups.pp.group_name} (ranks "
                                          f"{list(m.pp_group)}), not this mapping's TP group (ranks {list(m.tp_group)}")


def test_allreduce_on_the_default_group_fuses_when_tp_is_the_whole_world():
    """A TP group is a set of ranks: with TP = world, the default group (what init_device_mesh over the whole world
    reuses) is this Mapping's TP group, though init_process_groups never made it."""
    m = fxpasses.Mapping(world_size=2, rank=0, tp_size=2, pp_size=1)
    with fake_process_group(2, 0) as world:
        _, backend, _, after = compile_and_capture(RowParallelBlock(8, world.group_name).eval(),
                                                   (data(2, 8), data(2, 8, seed=1)), mapping=m)
    assert backend.report.matches == {"allreduce_add_rms_norm": 1} and backend.report.near_misses == []
    assert after["fxp.allreduce_add_rms_norm"] == 1 and "_c10d_functional.all_reduce" not in after


def test_allreduce_numbers_under_fake_group():
    """The fake backend's all_reduce returns its input, so the fused op must equal the unfused block exactly."""
    m = fxpasses.Mapping(world_size=2, rank=1, tp_size=2, pp_size=1)
    with fake_process_group(2, 1):
        groups = fxpasses.init_process_groups(m)
        model = RowParallelBlock(32, groups.tp.group_name, dtype=torch.bfloat16).eval()
        args = (data(5, 32, dtype=torch.bfloat16), data(5, 32, dtype=torch.bfloat16, seed=1))
        (out, res), backend, _, _ = compile_and_capture(model, args, mapping=m)
        with torch.no_grad():
            ref_out, ref_res = model(*args)
    assert backend.report.matches == {"allreduce_add_rms_norm": 1}
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)


# ---- fp8 --------------------------------------------------------------------------------------------------------
class NormQuant(torch.nn.Module):
    def __init__(self, d, dtype, with_add):
        super().__init__()
        self.with_add = with_add
        self.weight = torch.nn.Parameter(torch.rand(d, dtype=dtype) + 0.5)
        self.register_buffer("scale", torch.tensor(0.02))

    def forward(self, x, residual):
        if self.with_add:
            r = x + residual
            return quant(hf_norm(r, self.weight, 1e-6), self.scale), r
        return quant(hf_norm(x, self.weight, 1e-6), self.scale), quant(residual, self.scale)


def fp8_bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_add", [False, True])
def test_fp8_variants(dtype, with_add):
    model = NormQuant(24, dtype, with_add).eval()
    args = (data(3, 24, dtype=dtype), data(3, 24, dtype=dtype, seed=1))
    (q, other), backend, _, after = compile_and_capture(model, args)
    expected = {"add_rms_norm_quant_fp8": 1} if with_add else {"rms_norm_quant_fp8": 1, "quant_fp8": 1}
    assert backend.report.matches == expected
    fused = "fxp.add_rms_norm_quant_fp8" if with_add else "fxp.rms_norm_quant_fp8"
    assert after[fused] == 1 and "aten.rsqrt" not in after and "aten.clamp" not in after
    with torch.no_grad():
        ref_q, ref_other = model(*args)
    assert torch.equal(fp8_bits(q), fp8_bits(ref_q))  # the fused op computes exactly what the model does
    assert torch.equal(fp8_bits(other) if other.dtype == torch.float8_e4m3fn else other,
                       fp8_bits(ref_other) if ref_other.dtype == torch.float8_e4m3fn else ref_other)


def test_allreduce_fp8_variant():
    m = fxpasses.Mapping(world_size=4, rank=3, tp_size=2, pp_size=2)
    with fake_process_group(4, 3):
        groups = fxpasses.init_process_groups(m)
        model = RowParallelBlock(16, groups.tp.group_name, dtype=torch.bfloat16, fp8=True).eval()
        args = (data(2, 16, dtype=torch.bfloat16), data(2, 16, dtype=torch.bfloat16, seed=1))
        (q, r), backend, _, after = compile_and_capture(model, args, mapping=m)
        with torch.no_grad():
            ref_q, ref_r = model(*args)
    assert backend.report.matches == {"allreduce_add_rms_norm_quant_fp8": 1}
    assert after["fxp.allreduce_add_rms_norm_quant_fp8"] == 1 and "_c10d_functional.all_reduce" not in after
    assert torch.equal(fp8_bits(q), fp8_bits(ref_q)) and torch.equal(r, ref_r)
