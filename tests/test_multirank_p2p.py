"""pp_send / pp_recv and their list forms deliver exact values, in order, across real gloo ranks."""
import pytest
import torch

import fxpasses
from fxpasses.testing import RankError, RankPool, spawn

pytestmark = pytest.mark.multirank


def pipeline_relay(rank, world_size, tp, rounds):
    """Stage 0 sends [hidden, residual] down the pipeline; each later stage adds its rank and forwards."""
    m = fxpasses.Mapping(world_size=world_size, rank=rank, tp_size=tp, pp_size=world_size // tp)
    groups = fxpasses.init_process_groups(m)
    seen = []
    for k in range(rounds):
        if m.is_first_pp_rank:
            pair = [torch.full((2, 3), float(k * 100 + rank)), torch.arange(5.0) + k]
        else:
            pair = [torch.empty(2, 3), torch.empty(5)]
            torch.ops.fxp.pp_recv_tensors(pair, m.prev_pp_rank, groups.pp.group_name)
            seen.append([t.clone() for t in pair])
            pair = [pair[0] + rank, pair[1]]
        if not m.is_last_pp_rank:
            torch.ops.fxp.pp_send_tensors(pair, m.next_pp_rank, groups.pp.group_name)
    return seen


def single_tensor_ping_pong(rank, world_size):
    groups = fxpasses.init_process_groups(fxpasses.Mapping(world_size, rank, 1, world_size))
    buf = torch.zeros(4)
    if rank == 0:
        torch.ops.fxp.pp_send(torch.tensor([1.0, 2.0, 3.0, 4.0]), 1, groups.pp.group_name)
        torch.ops.fxp.pp_recv(buf, 1, groups.pp.group_name)
    else:
        torch.ops.fxp.pp_recv(buf, 0, groups.pp.group_name)
        torch.ops.fxp.pp_send(buf * 10, 0, groups.pp.group_name)
    return buf


def fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


@pytest.fixture(scope="module")
def pool4():
    with RankPool(4) as pool:
        yield pool


def test_two_ranks_ping_pong():
    out = spawn(single_tensor_ping_pong, 2)
    assert torch.equal(out[0], torch.tensor([10.0, 20.0, 30.0, 40.0]))
    assert torch.equal(out[1], torch.tensor([1.0, 2.0, 3.0, 4.0]))


@pytest.mark.parametrize("tp", [1, 2])
def test_list_send_recv_in_order(pool4, tp):
    rounds = 3
    out = pool4.run(pipeline_relay, tp, rounds)
    pp = 4 // tp
    for rank, seen in enumerate(out):
        stage, tp_rank = rank // tp, rank % tp
        if stage == 0:
            assert seen == []
            continue
        assert len(seen) == rounds
        for k, (hidden, residual) in enumerate(seen):
            # the value started at stage 0 (rank tp_rank) and picked up every intermediate stage's rank
            expected = k * 100 + tp_rank + sum(s * tp + tp_rank for s in range(1, stage))
            assert torch.equal(hidden, torch.full((2, 3), float(expected))), (rank, k)
            assert torch.equal(residual, torch.arange(5.0) + k)
    assert pp in (2, 4)


def test_failing_rank_surfaces_with_its_number():
    with pytest.raises(RankError, match="rank 1 of 2 raised:(.|\n)*ValueError: rank one refuses"):
        spawn(fail_on_rank_one, 2)


def sleep_forever(rank, world_size):
    import time

    time.sleep(600)


def test_timeout_kills_every_rank():
    import time

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish in time; all ranks killed"):
        spawn(sleep_forever, 2, timeout=10)
    assert time.monotonic() - t0 < 60


def test_unpicklable_function_is_refused_at_once():
    """A task reaches the ranks by pickle: a lambda or a closure is refused before any rank waits for it."""
    import time

    t0 = time.monotonic()
    with pytest.raises(TypeError, match="cannot be pickled .* define the function at module level"):
        spawn(lambda rank, world: rank, 2, timeout=60)
    assert time.monotonic() - t0 < 5  # refused before any rank starts, not after the timeout
