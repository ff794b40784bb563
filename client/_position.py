"""Positions in an epoch counted in samples, so that a job's shape may change mid-epoch.

NOTE [ Positions in samples ]
A position is (epoch, sample, batch): the next batch is batch `batch` of the
batches cut from sample `sample` of the epoch on (StreamBatchesRequest.start_sample),
so the samples consumed are sample + batch * batch_size, or, for the "elastic"
sampler, whose positions are global, sample + batch * batch_size * world_size.
A rank's order of samples does not depend on batch_size (nor, for "elastic", the
global order on world_size), so a new shape starts a new "segment" at the samples
consumed: (epoch, consumed, 0). Without a change the segment starts at 0 and
states look as they did when positions counted batches (which still load: their
sample is 0). "dynamic" packs batches over the whole epoch: its positions stay
batch indices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

SHAPE = frozenset({"batch_size", "rank", "world_size"})
"""Settings of a state that a resume may change, depending on the sampler kind."""
_RESHAPABLE = {"elastic": SHAPE, "dynamic": frozenset()}
_DEFAULT_RESHAPABLE = frozenset({"batch_size"})


def consumed(kind: str, sample: int, batch: int, batch_size: int, world_size: int) -> int:
    """The samples consumed at batch ``batch`` counted from ``sample``; raises ValueError for
    "dynamic" batches, which are not samples (unless ``batch`` is 0)."""
    if not batch:
        return sample
    if kind == "dynamic":
        raise ValueError(
            "the 'dynamic' sampler packs batches for the whole epoch, so its batch size "
            "can change only between epochs"
        )
    return sample + batch * batch_size * (world_size if kind == "elastic" else 1)


def refused_settings(
    saved: Mapping[str, Any], mine: Mapping[str, Any], kind: Callable[[], str], *, worker: bool
) -> list[str]:
    """The settings of ``saved`` that a resume from it cannot differ in, where they differ.

    ``kind`` is asked only when the shape differs; a DataLoader worker's share of
    the batches cannot change shape.
    """
    differ = [key for key in mine if saved.get(key) != mine[key]]
    allowed: frozenset[str] = frozenset()
    if not worker and SHAPE & set(differ):
        allowed = _RESHAPABLE.get(kind(), _DEFAULT_RESHAPABLE)
    return [key for key in differ if key not in allowed]
