import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpasses import Mapping, init_process_groups
from fxpasses.testing import fake_process_group


def test_tp2_pp2_table():
    rows = [Mapping(world_size=4, rank=r, tp_size=2, pp_size=2) for r in range(4)]
    assert [(m.tp_rank, m.pp_rank) for m in rows] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [m.tp_group for m in rows] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [m.pp_group for m in rows] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [m.prev_pp_rank for m in rows] == [None, None, 0, 1]
    assert [m.next_pp_rank for m in rows] == [2, 3, None, None]
    assert [m.is_first_pp_rank for m in rows] == [True, True, False, False]
    assert [m.is_last_pp_rank for m in rows] == [False, False, True, True]
    assert all(m.has_tp and m.has_pp for m in rows)


def test_defaults_are_single_rank():
    m = Mapping()
    assert (m.tp_group, m.pp_group, m.prev_pp_rank, m.next_pp_rank) == ((0,), (0,), None, None)
    assert not m.has_tp and not m.has_pp and m.is_first_pp_rank and m.is_last_pp_rank


def test_hashable_frozen_and_stable_dict():
    a, b = Mapping(4, 1, 2, 2), Mapping(world_size=4, rank=1, tp_size=2, pp_size=2)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert list(a.to_dict()) == ["pp_size", "rank", "tp_size", "world_size"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.rank = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=4, tp_size=3, pp_size=1), "tp_size \\* pp_size = 3 \\* 1 = 3, but world_size is 4"),
        (dict(world_size=4, rank=4, tp_size=4), "rank=4 is out of range; it must be in 0..3"),
        (dict(world_size=4, rank=-1, tp_size=4), "out of range"),
        (dict(world_size=0), "world_size=0 must be an integer of at least 1"),
        (dict(world_size=2, tp_size=0, pp_size=2), "tp_size=0"),
    ],
)
def test_bad_mapping_says_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mapping(**kwargs)


def test_bad_split_lists_valid_pairs():
    with pytest.raises(ValueError, match=r"\(1, 6\), \(2, 3\), \(3, 2\), \(6, 1\)"):
        Mapping(world_size=6, tp_size=4, pp_size=1)


def test_pp_layers_balanced_and_contiguous():
    shares = [Mapping(4, r * 1, 1, 4).pp_layers(10) for r in range(4)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="3 layers cannot be split over 4 pipeline stages"):
        Mapping(4, 0, 1, 4).pp_layers(3)


def test_from_env():
    env = {"RANK": "5", "WORLD_SIZE": "8", "TP_SIZE": "2"}
    assert Mapping.from_env(env) == Mapping(8, 5, 2, 4)
    assert Mapping.from_env({"RANK": "1", "WORLD_SIZE": "4", "PP_SIZE": "4"}) == Mapping(4, 1, 1, 4)
    assert Mapping.from_env({}) == Mapping()
    assert Mapping.from_env({"RANK": "0", "WORLD_SIZE": "4"}) == Mapping(4, 0, 4, 1)
    with pytest.raises(ValueError, match="TP_SIZE='two' is not an integer"):
        Mapping.from_env({"WORLD_SIZE": "4", "TP_SIZE": "two"})
    with pytest.raises(ValueError, match="WORLD_SIZE is 6"):
        Mapping.from_env({"WORLD_SIZE": "6", "TP_SIZE": "4", "PP_SIZE": "2"})


@st.composite
def mappings(draw):
    world = draw(st.integers(1, 24))
    tp = draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    return Mapping(world_size=world, rank=draw(st.integers(0, world - 1)), tp_size=tp, pp_size=world // tp)


@settings(max_examples=200, deadline=None)
@given(mappings(), st.integers(1, 64))
def test_groups_partition_the_world(m, layers):
    world = set(range(m.world_size))
    for groups in (m.all_tp_groups(), m.all_pp_groups()):
        flat = [r for g in groups for r in g]
        assert sorted(flat) == sorted(world) and len(flat) == len(set(flat))
    assert m.rank in m.tp_group and m.rank in m.pp_group
    assert m.tp_group in m.all_tp_groups() and m.pp_group in m.all_pp_groups()
    assert set(m.tp_group) & set(m.pp_group) == {m.rank}
    assert m.pp_group[m.pp_rank] == m.rank and m.tp_group[m.tp_rank] == m.rank
    if m.next_pp_rank is not None:
        assert m.with_rank(m.next_pp_rank).prev_pp_rank == m.rank
    if layers >= m.pp_size:
        shares = [m.with_rank(r).pp_layers(layers) for r in m.pp_group]
        assert [i for s in shares for i in s] == list(range(layers))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("tp, pp", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_init_process_groups_under_fake_pg(tp, pp):
    for rank in (0, 3, 7):
        m = Mapping(world_size=8, rank=rank, tp_size=tp, pp_size=pp)
        with fake_process_group(8, rank):
            import torch.distributed as dist

            groups = init_process_groups(m)
            assert tuple(dist.get_process_group_ranks(groups.tp)) == m.tp_group
            assert tuple(dist.get_process_group_ranks(groups.pp)) == m.pp_group
            assert groups.tp.group_name != groups.pp.group_name
            assert init_process_groups(m) is groups  # cached per process


def test_init_process_groups_checks_the_world():
    with fake_process_group(4, 1):
        with pytest.raises(ValueError, match="the Mapping says rank 0 of 2, but torch.distributed is rank 1 of 4"):
            init_process_groups(Mapping(2, 0, 2, 1))
    with pytest.raises(RuntimeError, match="init_process_group first"):
        init_process_groups(Mapping())


# ---- issue 11: errors name the argument or variable ------------------------------------------------------------
@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be at least 1"),
    ({"WORLD_SIZE": "4", "PP_SIZE": "0"}, "PP_SIZE='0' must be at least 1"),
    ({"WORLD_SIZE": "4", "TP_SIZE": "0"}, "TP_SIZE='0' must be at least 1"),
    ({"WORLD_SIZE": "4", "RANK": "-1"}, "RANK='-1' must be at least 0"),
    ({"WORLD_SIZE": "4", "RANK": "4"}, "RANK=4 is out of range for WORLD_SIZE=4"),
    ({"WORLD_SIZE": "6", "PP_SIZE": "4"}, "WORLD_SIZE=6 is not divisible by PP_SIZE=4"),
    ({"WORLD_SIZE": "6", "TP_SIZE": "4"}, "WORLD_SIZE=6 is not divisible by TP_SIZE=4"),
])
def test_from_env_names_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        Mapping.from_env(env)


def test_rank_must_be_an_integer_not_a_bool():
    with pytest.raises(ValueError, match="Mapping: rank=True must be an integer, not a bool"):
        Mapping(world_size=2, rank=True, tp_size=2)
    with pytest.raises(ValueError, match="Mapping: tp_size=2.0 must be an integer, not float"):
        Mapping(world_size=2, tp_size=2.0)


def test_numpy_integers_are_integers():
    np = pytest.importorskip("numpy")
    m = Mapping(world_size=np.int64(4), rank=np.int32(3), tp_size=np.int64(2), pp_size=np.int8(2))
    assert m == Mapping(4, 3, 2, 2) and hash(m) == hash(Mapping(4, 3, 2, 2))
    assert type(m.rank) is int and list(m.pp_layers(np.int64(4))) == [2, 3]


@pytest.mark.parametrize("layers, message", [(0, "num_layers=0 must be at least 1"),
                                             (-2, "num_layers=-2 must be at least 1"),
                                             (True, "num_layers=True must be an integer, not a bool")])
def test_pp_layers_refuses_no_layers(layers, message):
    with pytest.raises(ValueError, match=message):
        Mapping(4, 0, 1, 4).pp_layers(layers)


# ---- issue 12: Mappings from DeviceMeshes and groups that already exist ----------------------------------------------
@pytest.mark.parametrize("tp, pp", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_from_device_mesh_2d(tp, pp):
    from torch.distributed.device_mesh import init_device_mesh

    import torch.distributed as dist

    for rank in (0, 5):
        with fake_process_group(8, rank):
            mesh = init_device_mesh("cpu", (pp, tp), mesh_dim_names=("pp", "tp"))
            m = Mapping.from_device_mesh(mesh, tp_dim="tp", pp_dim="pp")
            assert m == Mapping(8, rank, tp, pp) == Mapping.from_device_mesh(mesh, tp_dim=1, pp_dim=0)
            assert tuple(dist.get_process_group_ranks(mesh.get_group("tp"))) == m.tp_group
            assert tuple(dist.get_process_group_ranks(mesh.get_group("pp"))) == m.pp_group
            groups = init_process_groups(m, tp_group=mesh.get_group("tp"), pp_group=mesh.get_group("pp"))
            assert groups.tp is mesh.get_group("tp") and groups.pp is mesh.get_group("pp")


def test_from_device_mesh_1d_and_the_default_group():
    from torch.distributed.device_mesh import init_device_mesh

    import torch.distributed as dist

    with fake_process_group(4, 2):
        mesh = init_device_mesh("cpu", (4,))
        assert Mapping.from_device_mesh(mesh) == Mapping(4, 2, 4, 1)
        assert Mapping.from_device_mesh(mesh, pp_dim=0) == Mapping(4, 2, 1, 4)
        groups = init_process_groups(Mapping(4, 2, 4, 1), tp_group=dist.group.WORLD)  # TP is the whole world
        assert groups.tp is dist.group.WORLD and tuple(dist.get_process_group_ranks(groups.pp)) == (2,)


def test_from_device_mesh_says_what_to_change():
    from torch.distributed.device_mesh import init_device_mesh

    with fake_process_group(8, 0):
        mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("tp", "pp"))
        with pytest.raises(ValueError, match="TP ranks fastest.*TP dimension last"):
            Mapping.from_device_mesh(mesh, tp_dim="tp", pp_dim="pp")
        with pytest.raises(ValueError, match="tp_dim='x' is not a dimension of the mesh; its dimensions are"):
            Mapping.from_device_mesh(mesh, tp_dim="x")
        with pytest.raises(ValueError, match="say which is which with tp_dim"):
            Mapping.from_device_mesh(mesh)
        with pytest.raises(ValueError, match="are the same mesh dimension"):
            Mapping.from_device_mesh(mesh, tp_dim="tp", pp_dim=0)
        with pytest.raises(ValueError, match=r"mesh dimension\(s\) \['pp'\] are neither tp_dim nor pp_dim"):
            Mapping.from_device_mesh(mesh, tp_dim="tp")
        with pytest.raises(ValueError, match="covers 2 ranks but the world has 8; pass the whole mesh"):
            Mapping.from_device_mesh(mesh["tp"])
        with pytest.raises(TypeError, match="mesh must be a torch.distributed DeviceMesh, got tuple"):
            Mapping.from_device_mesh((2, 4))


def test_init_process_groups_refuses_groups_with_other_ranks():
    import torch.distributed as dist

    with fake_process_group(4, 1):
        m = Mapping(4, 1, 2, 2)
        other = [dist.new_group(r) for r in ([0, 2], [1, 3])][1]  # rank 1's PP ranks, offered as its TP group
        with pytest.raises(ValueError, match=r"tp_group holds ranks \[1, 3\], but this rank's TP ranks are \[0, 1\]"):
            init_process_groups(m, tp_group=other)
        with pytest.raises(TypeError, match="pp_group must be a torch.distributed ProcessGroup"):
            init_process_groups(m, pp_group="1")
        groups = init_process_groups(m, pp_group=other)
        assert groups.pp is other and tuple(dist.get_process_group_ranks(groups.tp)) == (0, 1)
