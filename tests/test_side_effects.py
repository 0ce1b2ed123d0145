"""Sends are sent exactly once and in order; the verifier catches passes that drop, reorder or misplace effects."""
import pytest
import torch
import torch.fx

import fxpasses
from fxpasses import compat
from fxpasses.passes import PassResult
from fxpasses.testing import RankPool, fake_process_group


# ---- real ranks: a compiled sender and a compiled receiver ------------------------------------------------------
def sender(x, peer: int, group: str):
    h = torch.sin(x) * 2
    torch.ops.fxp.pp_send(h, peer, group)  # h is never read again: AOT would delete this without side-effect marks
    return x.sum()


def receiver(template, peer: int, group: str):
    buf = torch.empty_like(template)
    torch.ops.fxp.pp_recv(buf, peer, group)
    return buf * 10 + 1  # the received value must reach later ops


def compiled_p2p(rank, world_size, v2):
    groups = fxpasses.init_process_groups(fxpasses.Mapping(world_size, rank, 1, world_size))
    name = groups.pp.group_name
    backend = fxpasses.Backend(fxpasses.Mapping(world_size, rank, 1, world_size))
    seen = []
    with compat.set_auto_functionalized_v2(v2), torch.no_grad():
        if rank == 0:
            fn = torch.compile(sender, backend=backend, fullgraph=True)
            for k in range(3):
                fn(torch.full((5,), float(k)), 1, name)
        else:
            fn = torch.compile(receiver, backend=backend, fullgraph=True)
            for _ in range(3):
                seen.append(fn(torch.zeros(5), 0, name))
            # a fourth message is the extra send a duplicated op would have produced: nothing must be waiting
    return {"seen": seen, "graphs": backend.report.graphs, "errors": len(backend.report.errors)}


@pytest.fixture(scope="module")
def pool2():
    with RankPool(2, timeout=90) as pool:
        yield pool


@pytest.mark.multirank
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_send_of_unread_buffer_arrives_exactly_once_in_order(pool2, v2):
    out = pool2.run(compiled_p2p, v2)
    seen = out[1]["seen"]
    assert len(seen) == 3
    for k, value in enumerate(seen):
        expected = torch.sin(torch.full((5,), float(k))) * 2 * 10 + 1
        torch.testing.assert_close(value, expected)
    assert out[0]["errors"] == out[1]["errors"] == 0
    assert out[0]["graphs"] == 1 and out[1]["graphs"] == 1  # one compile served all three calls


def compiled_send_count(rank, world_size):
    """Count the messages: the sender sends 3 times; the receiver drains exactly 3 and then checks for a 4th."""
    import torch.distributed as dist

    groups = fxpasses.init_process_groups(fxpasses.Mapping(world_size, rank, 1, world_size))
    with torch.no_grad():
        if rank == 0:
            fn = torch.compile(sender, backend=fxpasses.Backend(), fullgraph=True)
            for k in range(3):
                fn(torch.full((5,), float(k)), 1, groups.pp.group_name)
            dist.send(torch.tensor([-1.0] * 5), dst=1, group=groups.pp)  # end marker
            return None
        got = []
        while True:
            buf = torch.empty(5)
            dist.recv(buf, src=0, group=groups.pp)
            if buf[0].item() == -1.0 and torch.all(buf == -1.0):
                return got
            got.append(buf)


@pytest.mark.multirank
def test_no_send_is_duplicated(pool2):
    got = pool2.run(compiled_send_count)[1]
    assert [t.tolist() for t in got] == [(torch.sin(torch.full((5,), float(k))) * 2).tolist() for k in range(3)]


# ---- the verifier ----------------------------------------------------------------------------------------------
def two_sends(x):
    torch.ops.fxp.pp_send(x * 2, 1, "0")
    torch.ops.fxp.pp_send(x * 3, 1, "0")
    return x + 1


def drop_first_send(gm, ctx):
    send = next(n for n in gm.graph.nodes if "pp_send" in str(n.args[0] if n.args else ""))
    for user in list(send.users):
        user.replace_all_uses_with(send.kwargs["_all_bases"][0] if "_all_bases" in send.kwargs else user)
        gm.graph.erase_node(user)
    gm.graph.erase_node(send)
    return PassResult(modified=True)


def swap_sends(gm, ctx):
    sends = [n for n in gm.graph.nodes if n.args and "pp_send" in str(n.args[0])]
    sends[0].prepend(sends[1].kwargs["_all_bases"][0])  # keep data order valid, then move the second send first
    sends[0].prepend(sends[1])
    return PassResult(modified=True)


def compile_with(pass_, strict):
    backend = fxpasses.Backend(extra_passes=[pass_], strict=strict, verify=True)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(two_sends, backend=backend, fullgraph=True)(torch.ones(3))
    return backend, out


@pytest.mark.parametrize("bad_pass, message", [
    (drop_first_send, "side effects changed: dropped"),
    (swap_sends, "(effect order broken|side effects changed)"),
])
def test_verifier_rejects_and_rolls_back(bad_pass, message):
    with fake_process_group(2, 0):
        backend, out = compile_with(bad_pass, strict=False)
        assert torch.equal(out, torch.full((3,), 2.0))
        (record,) = backend.report.errors
        assert record.name.endswith(bad_pass.__name__)
        import re

        assert re.search(message, record.error), record.error
        with pytest.raises(Exception, match=bad_pass.__name__) as info:
            compile_with(bad_pass, strict=True)
        chain, err = [], info.value  # Dynamo wraps backend errors; ours is in the chain, with its cause
        while err is not None:
            chain.append(type(err))
            err = getattr(err, "inner_exception", None) or err.__cause__
        assert chain[-2:] == [fxpasses.PassError, fxpasses.VerificationError], chain


def test_verifier_catches_a_read_moved_after_a_write():
    def f(x):
        y = x * 2  # reads x before the in-place write below
        x.add_(1)
        return y

    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(f, tracing_mode="fake")(torch.ones(3))
    from fxpasses.verifier import VerificationError, snapshot, verify

    snap = snapshot(gm.graph)
    mul = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    add_ = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add_.Tensor)
    add_.append(mul)  # now the read sees the mutated value
    with pytest.raises(VerificationError, match="war order broken: mul must come before add_"):
        verify(gm.graph, snap, "mover")


def test_dce_keeps_in_place_writes_after_defunctionalization():
    def f(x):
        buf = torch.zeros_like(x)
        torch.ops.fxp.pp_recv(buf, 1, "0")  # result unused: still a receive the peer is waiting for
        return x * 2

    from pattern_helpers import compile_and_capture

    with fake_process_group(2, 0):
        out, _, before, after = compile_and_capture(f, (torch.ones(3),))
    assert before["auto_functionalized_v2(fxp.pp_recv)"] == 1 and after["fxp.pp_recv"] == 1
    assert torch.equal(out, torch.full((3,), 2.0))


# ---- common-subexpression elimination never merges buffers ------------------------------------------------------
def two_receives_and_two_casts(template, group: str):
    a, b = torch.empty_like(template), torch.empty_like(template)
    torch.ops.fxp.pp_recv(a, 0, group)
    torch.ops.fxp.pp_recv(b, 0, group)
    return a.float() + b.float(), template.float() * template.float()


def test_cse_merges_repeated_casts_but_never_two_receive_buffers():
    from pattern_helpers import compile_and_capture

    with fake_process_group(2, 1) as world:
        _, backend, before, after = compile_and_capture(
            two_receives_and_two_casts, (torch.ones(4, dtype=torch.bfloat16), world.group_name), fullgraph=True)
    assert after["fxp.pp_recv"] == 2
    allocs = lambda ops: sum(v for k, v in ops.items() if k.startswith("aten.empty"))  # noqa: E731
    assert allocs(after) == allocs(before) == 2  # two buffers stay two buffers
    assert before["aten._to_copy"] == 4 and after["aten._to_copy"] == 3  # template.float() twice became once
    cse = next(p for p in backend.report.passes if p.name.endswith("eliminate_common_subexpressions"))
    assert cse.counts == {"merged": 1}
