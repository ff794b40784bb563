"""This trainer's share of an epoch: explicit arguments, else torch.distributed's default group.

As ``DistributedSampler`` does, a rank or world size that is not given comes
from the default process group when one is initialized (``torchrun`` +
``init_process_group``); without one, a trainer is rank 0 of 1.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist


def check_explicit(rank: int | None, world_size: int | None) -> None:
    """Refuses explicit values that no process group could make valid."""
    if world_size is not None and (
        not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0
    ):
        raise ValueError(
            f"world_size should be a positive integer value, but got world_size={world_size}"
        )
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
        raise ValueError(f"rank should be a non-negative integer, but got rank={rank}")
    if rank is not None and world_size is not None and rank >= world_size:
        raise ValueError(f"rank should be in [0, {world_size - 1}], but got rank={rank}")


def group_shard() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group, or None when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def resolve(rank: int | None, world_size: int | None, what: str) -> tuple[int, int]:
    """``(rank, world_size)``: each explicit value, else the default group's, else 0 of 1.

    Explicit values that disagree with an initialized group are kept, and a
    warning names both (a job whose ranks all pass rank=0 would train on
    duplicated data).
    """
    group = group_shard()
    shard = (
        rank if rank is not None else (group[0] if group else 0),
        world_size if world_size is not None else (group[1] if group else 1),
    )
    if group is not None and shard != group:
        warnings.warn(
            f"{what}: rank={shard[0]}, world_size={shard[1]} given, but the default process "
            f"group has rank {group[0]} of world size {group[1]}; streaming the share given "
            "(leave rank and world_size out to take the group's)",
            stacklevel=4,
        )
    if not 0 <= shard[0] < shard[1]:
        raise ValueError(
            f"rank should be in [0, {shard[1] - 1}], but got rank={shard[0]} "
            f"(world_size={shard[1]}{' from the process group' if world_size is None else ''})"
        )
    return shard
