"""Builds batches: load each sample, collate, and write the payloads to a file in shared memory.

Runs inside a worker process; plain Python with no gRPC. Errors name the
dataset and the sample index, so that the stream can end with a message that
tells the user which sample of which dataset broke.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import default_collate

from batchwire import wire
from batchwire.server._fastpath import KeptFiles, PayloadFile, write_payload_file
from batchwire.server.direct_collate import collate_into, write_into
from batchwire.server.pipeline import get_items
from batchwire.v1 import batchwire_pb2 as pb


class BatchBuildError(RuntimeError):
    """A dataset, transform or collate function raised while building a batch."""


ITEM_ERRORS = (Exception, SystemExit, KeyboardInterrupt)
"""What a dataset, transform or collate function may raise to fail its batch.

``SystemExit`` too: an item that calls ``sys.exit`` used to kill its worker, so
the pool blamed the first sample of the task and lost the good batches built
before it. A worker's life is governed by its pipe, never by an item's code.
"""


def load_samples(
    dataset: Any, name: str, indices: Sequence[int], *, seed: int = 0, epoch: int = 0
) -> list[Any]:
    """Items ``indices`` of ``dataset``, transformed with each sample's ``(seed, epoch, index)`` RNG.

    ``dataset`` is a ``Pipeline`` (its ``load`` applies the transforms) or any
    map-style dataset. All in one call where it can (``Pipeline.load_many``: a
    source's ``__getitems__``, as DataLoader calls it); if that raises, sample
    by sample, so that the error names the sample that broke.
    """
    indices = [int(index) for index in indices]
    load_many = getattr(dataset, "load_many", None)
    try:
        if load_many is not None:
            return load_many(indices, seed=seed, epoch=epoch)
        return get_items(dataset, indices)
    except ITEM_ERRORS as exc:
        failed = exc
    load = getattr(dataset, "load", None)
    samples = []
    for index in indices:
        try:
            if load is not None:
                samples.append(load(index, seed=seed, epoch=epoch))
            else:
                samples.append(dataset[index])
        except ITEM_ERRORS as exc:
            raise BatchBuildError(
                f"dataset {name!r}, sample index {index}: {type(exc).__name__}: {exc}"
            ) from exc
    # Every sample loads on its own: the batch call (``__getitems__``) is what broke.
    raise BatchBuildError(
        f"dataset {name!r}, the batch starting at sample index {indices[0]}: "
        f"{type(failed).__name__}: {failed}"
    ) from failed


def source_batch(pipeline: Any, method: str, *args: Any) -> Any | None:
    """The pipeline's one-call batch: ``load_batch(indices)``, or ``load_batch_into(indices,
    reserve)`` (its header; the payload gathered straight into ``reserve(size)``).

    None where the pipeline has none, or if it failed: the per-sample path runs
    instead (writing that memory again), so that the error names the sample that broke.
    """
    call = getattr(pipeline, method, None)
    if call is None:
        return None
    try:
        return call(*args)
    except Exception:
        return None


def collate(
    samples: list[Any], name: str, collate_fn: Callable[[list[Any]], Any] = default_collate
) -> Any:
    try:
        return collate_fn(samples)
    except ITEM_ERRORS as exc:
        raise BatchBuildError(
            f"dataset {name!r}: collate failed: {type(exc).__name__}: {exc}"
        ) from exc


def encode_batch(batch: Any, name: str) -> tuple[pb.BatchHeader, list[torch.Tensor]]:
    """The batch's header (tensor layout, nesting) and its tensors in payload order."""
    try:
        tensors, structure = wire.flatten(batch)
    except wire.WireError as exc:
        raise BatchBuildError(f"dataset {name!r}: {exc}") from exc
    header, _ = wire.header_for(tensors, structure)
    return header, tensors


def encode_or_blame(
    pipeline: Any, name: str, indices: Sequence[int], batch: Any, *, seed: int = 0, epoch: int = 0
) -> tuple[pb.BatchHeader, list[torch.Tensor]]:
    """``encode_batch``, with an error that names the sample when the batch cannot travel.

    Only on that error path, each sample is loaded again and encoded on its own,
    until the first that cannot (nested too deep, a string, ...) is found.
    """
    try:
        return encode_batch(batch, name)
    except BatchBuildError as exc:
        culprit = _unsendable_sample(pipeline, name, indices, seed=seed, epoch=epoch)
        where = (
            f"sample index {culprit}"
            if culprit is not None
            else f"the batch starting at sample index {int(indices[0])}"
        )
        raise BatchBuildError(f"dataset {name!r}, {where}: {exc.__cause__}") from exc


def _unsendable_sample(
    pipeline: Any, name: str, indices: Sequence[int], *, seed: int, epoch: int
) -> int | None:
    collate_fn = getattr(pipeline, "collate_fn", default_collate)
    for index in indices:
        try:
            samples = load_samples(pipeline, name, [index], seed=seed, epoch=epoch)
            wire.flatten(collate(samples, name, collate_fn))
        except wire.WireError:
            return int(index)
        except ITEM_ERRORS:
            continue  # not this sample's own fault
    return None


def write_batch(batch: Any, name: str, path: str) -> tuple[pb.BatchHeader, int]:
    """Encodes ``batch`` into ``path`` (created here); returns its header and payload size."""
    header, tensors = encode_batch(batch, name)
    if header.payload_size:
        write_payload_file(path, tensors, header.tensors, header.payload_size)  # see _fastpath
    return header, header.payload_size


@dataclass
class WrittenBatches:
    """What a worker built into one payload file: each batch's header and offset, in order.

    ``error`` says why the batch after the last one failed; the ones before it
    are still good and are sent before the stream ends with the error.
    """

    headers: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    size: int = 0
    error: str | None = None


Put = Callable[[pb.BatchHeader, list[torch.Tensor] | None], None]
"""Where a built batch's bytes go: a payload file, a buffer, an object store.

``tensors`` None: the payload is already written, into the memory that the
build's ``reserve`` handed out last.
"""

Reserve = Callable[[int, int], memoryview]
"""``reserve(size, left)``: writable memory for the next batch's payload (``left``
batches of the task to go, counting it), for collating straight into it."""


def build_each(
    pipeline: Any,
    name: str,
    batches: Sequence[Sequence[int]],
    put: Put,
    *,
    seed: int = 0,
    epoch: int = 0,
    reserve: Reserve | None = None,
) -> str | None:
    """Builds ``batches`` in order, handing each header and its tensors to ``put``.

    Building (indices -> header + tensors) knows nothing of where the bytes go.
    With ``reserve``, a source's gather or a batch of the default collate is
    written straight into the memory it hands out (``direct_collate``), then
    ``put(header, None)``.
    Stops at the first batch that fails and returns why (naming the dataset and
    the sample); None when all were built.
    """
    for done, indices in enumerate(batches):
        left = len(batches) - done

        def into(size: int) -> memoryview:
            assert reserve is not None
            return reserve(size, left)  # noqa: B023 (called before the loop goes on)

        try:
            if reserve is not None:
                header = source_batch(pipeline, "load_batch_into", indices, into)
                if header is not None:
                    put(header, None)
                    continue
            batch = source_batch(pipeline, "load_batch", indices)
            if batch is None:
                samples = load_samples(pipeline, name, indices, seed=seed, epoch=epoch)
                collate_fn = getattr(pipeline, "collate_fn", default_collate)
                if reserve is not None and collate_fn is default_collate:
                    header = collate_into(samples, into)
                    if header is not None:
                        put(header, None)
                        continue
                batch = collate(samples, name, collate_fn)
            header, tensors = encode_or_blame(
                pipeline, name, indices, batch, seed=seed, epoch=epoch
            )
            if reserve is not None and header.payload_size:
                # Another collate, or a source's gather: one copy into the payload memory.
                size = header.payload_size
                write_into(into(size), tensors, header.tensors, size)
                put(header, None)
            else:
                put(header, tensors)
        except BatchBuildError as exc:
            return str(exc)
        except ITEM_ERRORS as exc:
            where = traceback.format_exception_only(exc)[-1].strip()
            return f"dataset {name!r}: worker failed: {where}"
    return None


def build_and_write(
    pipeline: Any,
    name: str,
    batches: Sequence[Sequence[int]],
    path: str,
    *,
    seed: int = 0,
    epoch: int = 0,
    kept: KeptFiles | None = None,
) -> WrittenBatches:
    """Builds ``batches`` in order into one payload file, each at an aligned offset.

    Several small batches share a file (one create, one map) instead of a file each.
    Stops at the first batch that fails, keeping those before it. ``kept``: the
    worker's files kept mapped between tasks (see ``_fastpath``).
    """
    out = PayloadFile(path, kept)
    written = WrittenBatches()

    def reserve(size: int, left: int) -> memoryview:
        if not size:
            return memoryview(bytearray())  # only empty tensors: no file, as with put
        base = wire.aligned(written.size)
        # The task's later batches are likely this size: map room for them at once.
        memory = out.region(written.size, base + size, base + wire.aligned(size) * left)
        memory[: base - written.size] = bytes(base - written.size)  # the gap before it
        return memory[base - written.size :]

    def put(header: pb.BatchHeader, tensors: list[torch.Tensor] | None) -> None:
        base = wire.aligned(written.size)
        if tensors is not None:
            out.write(tensors, header.tensors, base, header.payload_size)
        written.headers.append(header.SerializeToString())
        written.offsets.append(base)
        written.size = base + header.payload_size

    try:
        written.error = build_each(
            pipeline, name, batches, put, seed=seed, epoch=epoch, reserve=reserve
        )
    finally:
        out.close(written.size)
    return written
