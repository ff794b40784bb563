"""Builds one batch: load each sample, collate, and write the payload to a file in shared memory.

Runs inside a worker process; plain Python with no gRPC. Errors name the
dataset and the sample index, so that the stream can end with a message that
tells the user which sample of which dataset broke.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import default_collate

from batchwire import wire
from batchwire.server._fastpath import write_payload_file
from batchwire.v1 import batchwire_pb2 as pb


class BatchBuildError(RuntimeError):
    """A dataset, transform or collate function raised while building a batch."""


def load_samples(
    dataset: Any, name: str, indices: Sequence[int], *, seed: int = 0, epoch: int = 0
) -> list[Any]:
    """Items ``indices`` of ``dataset``, transformed with each sample's ``(seed, epoch, index)`` RNG.

    ``dataset`` is a ``Pipeline`` (its ``load`` applies the transforms) or any
    map-style dataset.
    """
    load = getattr(dataset, "load", None)
    samples = []
    for index in indices:
        try:
            if load is not None:
                samples.append(load(int(index), seed=seed, epoch=epoch))
            else:
                samples.append(dataset[int(index)])
        except Exception as exc:
            raise BatchBuildError(
                f"dataset {name!r}, sample index {int(index)}: {type(exc).__name__}: {exc}"
            ) from exc
    return samples


def build_batch(
    pipeline: Any, name: str, indices: Sequence[int], *, seed: int = 0, epoch: int = 0
) -> Any:
    """The collated batch of ``indices``: in one call where the pipeline can, else per sample.

    If the one-call path fails, the per-sample path runs instead, so that the
    error names the sample that broke.
    """
    batched = getattr(pipeline, "load_batch", None)
    if batched is not None:
        try:
            batch = batched(indices)
        except Exception:
            batch = None
        if batch is not None:
            return batch
    samples = load_samples(pipeline, name, indices, seed=seed, epoch=epoch)
    return collate(samples, name, getattr(pipeline, "collate_fn", default_collate))


def collate(
    samples: list[Any], name: str, collate_fn: Callable[[list[Any]], Any] = default_collate
) -> Any:
    try:
        return collate_fn(samples)
    except Exception as exc:
        raise BatchBuildError(
            f"dataset {name!r}: collate failed: {type(exc).__name__}: {exc}"
        ) from exc


def write_batch(batch: Any, name: str, path: str) -> tuple[pb.BatchHeader, int]:
    """Encodes ``batch`` into ``path`` (created here); returns its header and payload size."""
    try:
        tensors, structure = wire.flatten(batch)
    except wire.WireError as exc:
        raise BatchBuildError(f"dataset {name!r}: {exc}") from exc
    metas, size = wire.layout(tensors)
    header = pb.BatchHeader(
        payload_size=size,
        raw_size=size,
        tensors=metas,
        structure=structure,
        num_samples=_num_samples(tensors),
    )
    if size:
        write_payload_file(path, tensors, metas, size)  # pwrite: see _fastpath
    return header, size


def _num_samples(tensors: list[Any]) -> int:
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0


def open_payload(path: str, size: int) -> memoryview:
    """Maps a finished payload read-only and removes its name; memory lives while the view does."""
    if size == 0:
        return memoryview(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        # MAP_POPULATE maps every page now, in one call, instead of one fault per page.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        os.unlink(path)
    return memoryview(mapped)
