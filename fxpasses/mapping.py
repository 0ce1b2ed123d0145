"""The parallel layout of one rank: world size, rank, tensor- and pipeline-parallel sizes.

Tensor-parallel ranks vary fastest, as in the engine fxpasses grew from: ``tp_rank = rank % tp_size`` and
``pp_rank = rank // tp_size``. So ranks ``0..tp-1`` are stage 0, the next ``tp`` ranks stage 1, and so on; the
PP group of a rank is every rank with the same ``tp_rank``.

The Mapping is pure data (frozen, hashable, usable in cache keys). The process groups it describes are created
by :func:`init_process_groups`, because torch requires every rank to take part in creating every group.
"""
from __future__ import annotations

import operator
import os
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch.distributed as dist


@dataclass(frozen=True)
class Mapping:
    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "rank", "tp_size", "pp_size"):
            # numpy and other integer types become plain ints (the Mapping is hashed and compared); bool is refused
            object.__setattr__(self, name, _as_int(f"Mapping: {name}", getattr(self, name)))
        for name in ("world_size", "tp_size", "pp_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"Mapping: {name}={value!r} must be an integer of at least 1.")
        if self.tp_size * self.pp_size != self.world_size:
            raise ValueError(
                f"Mapping: tp_size * pp_size = {self.tp_size} * {self.pp_size} = {self.tp_size * self.pp_size}, "
                f"but world_size is {self.world_size}; they must be equal "
                f"(valid (tp, pp) pairs for world_size {self.world_size}: {_factor_pairs(self.world_size)})."
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"Mapping: rank={self.rank!r} is out of range; it must be in 0..{self.world_size - 1}."
            )

    # ---- this rank's coordinates -------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_group(self) -> tuple[int, ...]:
        """Global ranks of this rank's tensor-parallel group (same pipeline stage)."""
        start = self.pp_rank * self.tp_size
        return tuple(range(start, start + self.tp_size))

    @property
    def pp_group(self) -> tuple[int, ...]:
        """Global ranks of this rank's pipeline group (same tp_rank, one per stage, in stage order)."""
        return tuple(self.tp_rank + stage * self.tp_size for stage in range(self.pp_size))

    @property
    def has_tp(self) -> bool:
        return self.tp_size > 1

    @property
    def has_pp(self) -> bool:
        return self.pp_size > 1

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_pp_rank(self) -> int | None:
        """Global rank of the previous stage's peer, or None on the first stage."""
        return None if self.is_first_pp_rank else self.rank - self.tp_size

    @property
    def next_pp_rank(self) -> int | None:
        """Global rank of the next stage's peer, or None on the last stage."""
        return None if self.is_last_pp_rank else self.rank + self.tp_size

    # ---- layout helpers -----------------------------------------------------------------------------------
    def all_tp_groups(self) -> list[tuple[int, ...]]:
        return [tuple(range(s * self.tp_size, (s + 1) * self.tp_size)) for s in range(self.pp_size)]

    def all_pp_groups(self) -> list[tuple[int, ...]]:
        return [tuple(t + s * self.tp_size for s in range(self.pp_size)) for t in range(self.tp_size)]

    def pp_layers(self, num_layers: int) -> range:
        """This stage's contiguous, balanced share of ``num_layers``; earlier stages take the remainder."""
        num_layers = _as_int("Mapping.pp_layers: num_layers", num_layers)
        if num_layers < 1:
            raise ValueError(f"Mapping.pp_layers: num_layers={num_layers} must be at least 1 (the model's layer count).")
        if num_layers < self.pp_size:
            raise ValueError(
                f"Mapping.pp_layers: {num_layers} layers cannot be split over {self.pp_size} pipeline stages; "
                f"every stage needs at least one layer (use pp_size <= {num_layers})."
            )
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (1 if self.pp_rank < extra else 0))

    def with_rank(self, rank: int) -> "Mapping":
        return Mapping(world_size=self.world_size, rank=rank, tp_size=self.tp_size, pp_size=self.pp_size)

    def to_dict(self) -> dict[str, int]:
        """A stable, JSON-able description for cache keys and reports."""
        return dict(sorted(asdict(self).items()))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Mapping":
        """Read ``RANK`` and ``WORLD_SIZE`` (what torchrun sets) and ``TP_SIZE`` / ``PP_SIZE``.

        A missing ``PP_SIZE`` means ``world_size // TP_SIZE``; a missing ``TP_SIZE`` means
        ``world_size // PP_SIZE``; both missing means pure tensor parallelism.
        """
        env = os.environ if environ is None else environ

        def read(name: str, minimum: int) -> int | None:
            raw = env.get(name)
            if raw is None or raw == "":
                return None
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"Mapping.from_env: {name}={raw!r} is not an integer.") from None
            if value < minimum:
                raise ValueError(f"Mapping.from_env: {name}={raw!r} must be at least {minimum}.")
            return value

        world_size = read("WORLD_SIZE", 1)
        world_size = 1 if world_size is None else world_size
        rank = read("RANK", 0)
        rank = 0 if rank is None else rank
        if rank >= world_size:
            raise ValueError(f"Mapping.from_env: RANK={rank} is out of range for WORLD_SIZE={world_size} "
                             f"(it must be in 0..{world_size - 1}).")
        tp, pp = read("TP_SIZE", 1), read("PP_SIZE", 1)
        if tp is None and pp is None:
            tp, pp = world_size, 1
        elif tp is None or pp is None:
            given, size = ("PP_SIZE", pp) if tp is None else ("TP_SIZE", tp)
            assert size is not None
            if world_size % size:
                raise ValueError(f"Mapping.from_env: WORLD_SIZE={world_size} is not divisible by {given}={size} "
                                 f"(valid (TP_SIZE, PP_SIZE) pairs: {_factor_pairs(world_size)}).")
            tp, pp = (world_size // size, size) if tp is None else (size, world_size // size)
        elif tp * pp != world_size:
            raise ValueError(f"Mapping.from_env: TP_SIZE * PP_SIZE = {tp} * {pp} = {tp * pp}, but WORLD_SIZE is "
                             f"{world_size}; they must be equal (valid pairs: {_factor_pairs(world_size)}).")
        return cls(world_size=world_size, rank=rank, tp_size=tp, pp_size=pp)

    @classmethod
    def from_device_mesh(cls, mesh: Any, tp_dim: int | str | None = None, pp_dim: int | str | None = None) -> "Mapping":
        """The Mapping of a ``DeviceMesh`` that spans the whole world (what ``init_device_mesh`` makes).

        ``tp_dim`` / ``pp_dim`` name the mesh dimensions (by name or index) holding tensor and pipeline parallelism;
        a 1-D mesh with neither given is pure TP. The mesh must put TP ranks fastest, as the Mapping does
        (``init_device_mesh(dev, (pp, tp), mesh_dim_names=("pp", "tp"))``); then the mesh's groups hold exactly the
        Mapping's TP and PP ranks, and collectives on them fuse whatever their group names are.
        """
        ranks = getattr(mesh, "mesh", None)
        if ranks is None or not hasattr(mesh, "ndim"):
            raise TypeError(f"Mapping.from_device_mesh: mesh must be a torch.distributed DeviceMesh, "
                            f"got {type(mesh).__name__}.")
        if tp_dim is None and pp_dim is None:
            if mesh.ndim != 1:
                raise ValueError(f"Mapping.from_device_mesh: the mesh has {mesh.ndim} dimensions "
                                 f"{_dim_names(mesh)}; say which is which with tp_dim=... and pp_dim=....")
            tp_dim = 0
        dims = {label: _mesh_dim(mesh, label, d) for label, d in (("tp_dim", tp_dim), ("pp_dim", pp_dim))
                if d is not None}
        if len(set(dims.values())) < len(dims):
            raise ValueError(f"Mapping.from_device_mesh: tp_dim={tp_dim!r} and pp_dim={pp_dim!r} are the same "
                             "mesh dimension; give two different ones.")
        others = [d for d in range(mesh.ndim) if d not in dims.values() and ranks.shape[d] > 1]
        if others:
            raise ValueError(f"Mapping.from_device_mesh: mesh dimension(s) {[_dim_label(mesh, d) for d in others]} "
                             "are neither tp_dim nor pp_dim; a Mapping describes tensor and pipeline parallelism only.")
        tp = ranks.shape[dims["tp_dim"]] if "tp_dim" in dims else 1
        pp = ranks.shape[dims["pp_dim"]] if "pp_dim" in dims else 1
        order = [dims.get("pp_dim"), dims.get("tp_dim")]
        rest = [d for d in range(mesh.ndim) if d not in order]
        layout = ranks.permute(*rest, *[d for d in order if d is not None]).reshape(-1).tolist()
        world = tp * pp
        if dist.is_initialized() and dist.get_world_size() != world:
            raise ValueError(f"Mapping.from_device_mesh: the mesh covers {world} ranks but the world has "
                             f"{dist.get_world_size()}; pass the whole mesh (with tp_dim and pp_dim), not a slice of it.")
        if layout != list(range(world)):
            raise ValueError(
                f"Mapping.from_device_mesh: ordered (pp, tp) the mesh holds ranks {layout}, but a Mapping puts TP ranks "
                f"fastest ({list(range(world))}: rank = pp_rank * tp_size + tp_rank). Build the mesh with the TP "
                "dimension last, e.g. init_device_mesh(device, (pp, tp), mesh_dim_names=('pp', 'tp')).")
        rank = dist.get_rank() if dist.is_initialized() else mesh.get_rank()
        return cls(world_size=world, rank=rank, tp_size=tp, pp_size=pp)


def _as_int(what: str, value: Any) -> int:
    """``value`` as a plain int: any integer type (numpy's too), never a bool or a float."""
    if isinstance(value, bool):
        raise ValueError(f"{what}={value!r} must be an integer, not a bool.")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what}={value!r} must be an integer, not {type(value).__name__}.") from None


def _dim_names(mesh: Any) -> list[str]:
    return list(mesh.mesh_dim_names or range(mesh.ndim))


def _dim_label(mesh: Any, d: int) -> str | int:
    return mesh.mesh_dim_names[d] if mesh.mesh_dim_names else d


def _mesh_dim(mesh: Any, label: str, dim: int | str) -> int:
    names = list(mesh.mesh_dim_names or ())
    if isinstance(dim, str):
        if dim not in names:
            raise ValueError(f"Mapping.from_device_mesh: {label}={dim!r} is not a dimension of the mesh; its "
                             f"dimensions are {_dim_names(mesh)}.")
        return names.index(dim)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -mesh.ndim <= dim < mesh.ndim:
        raise ValueError(f"Mapping.from_device_mesh: {label}={dim!r} must be a dimension name or an index below "
                         f"{mesh.ndim}; the mesh's dimensions are {_dim_names(mesh)}.")
    return dim % mesh.ndim


def _factor_pairs(n: int) -> list[tuple[int, int]]:
    return [(t, n // t) for t in range(1, n + 1) if n % t == 0]


class ProcessGroups(NamedTuple):
    """This rank's tensor- and pipeline-parallel process groups."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup


# Per-process cache: one entry per (default group, mapping). The default group is part of the key so that a
# destroyed and re-initialized world (tests do this many times in one process) never reuses stale groups.
_GROUPS: dict[tuple[int, Mapping], tuple[object, ProcessGroups]] = {}


def init_process_groups(mapping: Mapping, backend: str | None = None, *, tp_group: dist.ProcessGroup | None = None,
                        pp_group: dist.ProcessGroup | None = None) -> ProcessGroups:
    """Create every TP and PP group on every rank in the same order, and return this rank's two groups.

    Must be called by every rank (torch's ``new_group`` is collective over the world). ``backend`` defaults to
    the default group's backend. Cached per process: calling again with the same Mapping returns the same groups.

    ``tp_group`` / ``pp_group`` adopt groups that already exist (a DeviceMesh's ``mesh.get_group("tp")``, your own
    ``new_group``, the default group when TP is the whole world) instead of creating new ones: their ranks must be
    this rank's TP / PP ranks in the Mapping's order. Only the groups not given are created (collectively). Fusion
    never needs this (a collective fuses when its group's ranks are the Mapping's TP ranks, whatever made the
    group); it makes our own ops (``pp_send``, the fused collectives of ``fxpasses.models``) use your groups.
    """
    if not dist.is_initialized():
        raise RuntimeError("init_process_groups: call torch.distributed.init_process_group first.")
    if dist.get_world_size() != mapping.world_size or dist.get_rank() != mapping.rank:
        raise ValueError(
            f"init_process_groups: the Mapping says rank {mapping.rank} of {mapping.world_size}, but "
            f"torch.distributed is rank {dist.get_rank()} of {dist.get_world_size()}; build the Mapping "
            f"with Mapping.from_env() or the same rank and world size."
        )
    _check_adopted("tp_group", tp_group, mapping.tp_group, "TP")
    _check_adopted("pp_group", pp_group, mapping.pp_group, "PP")
    world = dist.group.WORLD
    key = (id(world), mapping)
    cached = _GROUPS.get(key)
    if cached is not None and cached[0] is world and tp_group is None and pp_group is None:
        return cached[1]
    tp, pp = tp_group, pp_group
    if tp_group is None:
        for ranks in mapping.all_tp_groups():
            group = dist.new_group(list(ranks), backend=backend)
            if mapping.rank in ranks:
                tp = group
    if pp_group is None:
        for ranks in mapping.all_pp_groups():
            group = dist.new_group(list(ranks), backend=backend)
            if mapping.rank in ranks:
                pp = group
    assert tp is not None and pp is not None
    groups = ProcessGroups(tp=tp, pp=pp)
    _GROUPS[key] = (world, groups)
    return groups


def _check_adopted(name: str, group: Any, expected: tuple[int, ...], kind: str) -> None:
    if group is None:
        return
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"init_process_groups: {name} must be a torch.distributed ProcessGroup (e.g. "
                        f"mesh.get_group('{kind.lower()}')), got {type(group).__name__}.")
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks != expected:
        raise ValueError(f"init_process_groups: {name} holds ranks {list(ranks)}, but this rank's {kind} ranks are "
                         f"{list(expected)} in the Mapping; build the Mapping from the same layout "
                         "(Mapping.from_device_mesh(mesh, tp_dim=..., pp_dim=...)) or pass the matching group.")


def forget_process_groups() -> None:
    """Drop cached groups (called when the default group is destroyed)."""
    _GROUPS.clear()


def cached_process_groups(mapping: Mapping) -> ProcessGroups | None:
    """This rank's groups if ``init_process_groups`` already created them; never creates groups.

    Compilation must not create groups: ``new_group`` is collective, and ranks of different pipeline stages
    compile different graphs at different times.
    """
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    cached = _GROUPS.get((id(world), mapping))
    return cached[1] if cached is not None and cached[0] is world else None
