"""The parallel layout of one rank: world size, rank, tensor- and pipeline-parallel sizes.

Tensor-parallel ranks vary fastest, as in the engine fxpasses grew from: ``tp_rank = rank % tp_size`` and
``pp_rank = rank // tp_size``. So ranks ``0..tp-1`` are stage 0, the next ``tp`` ranks stage 1, and so on; the
PP group of a rank is every rank with the same ``tp_rank``.

The Mapping is pure data (frozen, hashable, usable in cache keys). The process groups it describes are created
by :func:`init_process_groups`, because torch requires every rank to take part in creating every group.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch.distributed as dist


@dataclass(frozen=True)
class Mapping:
    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp_size", "pp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mapping: {name}={value!r} must be an integer of at least 1.")
        if self.tp_size * self.pp_size != self.world_size:
            raise ValueError(
                f"Mapping: tp_size * pp_size = {self.tp_size} * {self.pp_size} = {self.tp_size * self.pp_size}, "
                f"but world_size is {self.world_size}; they must be equal "
                f"(valid (tp, pp) pairs for world_size {self.world_size}: {_factor_pairs(self.world_size)})."
            )
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
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

        def read(name: str) -> int | None:
            raw = env.get(name)
            if raw is None or raw == "":
                return None
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"Mapping.from_env: {name}={raw!r} is not an integer.") from None

        world_size = read("WORLD_SIZE") or 1
        rank = read("RANK") or 0
        tp, pp = read("TP_SIZE"), read("PP_SIZE")
        if tp is None and pp is None:
            tp, pp = world_size, 1
        elif tp is None:
            tp = world_size // pp if pp else 0
        elif pp is None:
            pp = world_size // tp if tp else 0
        return cls(world_size=world_size, rank=rank, tp_size=tp, pp_size=pp)


def _factor_pairs(n: int) -> list[tuple[int, int]]:
    return [(t, n // t) for t in range(1, n + 1) if n % t == 0]


class ProcessGroups(NamedTuple):
    """This rank's tensor- and pipeline-parallel process groups."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup


# Per-process cache: one entry per (default group, mapping). The default group is part of the key so that a
# destroyed and re-initialized world (tests do this many times in one process) never reuses stale groups.
_GROUPS: dict[tuple[int, Mapping], tuple[object, ProcessGroups]] = {}


def init_process_groups(mapping: Mapping, backend: str | None = None) -> ProcessGroups:
    """Create every TP and PP group on every rank in the same order, and return this rank's two groups.

    Must be called by every rank (torch's ``new_group`` is collective over the world). ``backend`` defaults to
    the default group's backend. Cached per process: calling again with the same Mapping returns the same groups.
    """
    if not dist.is_initialized():
        raise RuntimeError("init_process_groups: call torch.distributed.init_process_group first.")
    if dist.get_world_size() != mapping.world_size or dist.get_rank() != mapping.rank:
        raise ValueError(
            f"init_process_groups: the Mapping says rank {mapping.rank} of {mapping.world_size}, but "
            f"torch.distributed is rank {dist.get_rank()} of {dist.get_world_size()}; build the Mapping "
            f"with Mapping.from_env() or the same rank and world size."
        )
    world = dist.group.WORLD
    key = (id(world), mapping)
    cached = _GROUPS.get(key)
    if cached is not None and cached[0] is world:
        return cached[1]
    tp = pp = None
    for ranks in mapping.all_tp_groups():
        group = dist.new_group(list(ranks), backend=backend)
        if mapping.rank in ranks:
            tp = group
    for ranks in mapping.all_pp_groups():
        group = dist.new_group(list(ranks), backend=backend)
        if mapping.rank in ranks:
            pp = group
    assert tp is not None and pp is not None
    groups = ProcessGroups(tp=tp, pp=pp)
    _GROUPS[key] = (world, groups)
    return groups


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
