"""What an executor takes and hands out: task records, built batches, and typed failures.

Each failure is its own type, and each type ends a stream with one gRPC status
(the table ``FAILURE_STATUS`` in ``service.py``): a ``BuildError`` (a batch
failed, its worker kept crashing, it timed out) with INTERNAL, an
``Unavailable`` (the executor closed or failed: resume elsewhere) with
UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from batchwire.v1 import batchwire_pb2 as pb


class BuildError(RuntimeError):
    """A batch could not be built; the message names the dataset and the sample."""


class Unavailable(RuntimeError):
    """This server cannot build batches now; a client resumes on another server."""


class WorkerCrashed(BuildError):
    """Workers kept dying while building one batch."""


class ExecutorClosed(Unavailable):
    """The executor was shut down before the batch was built."""


class BatchFailed(BuildError):
    """The worker reported an error building a batch (message says which sample).

    ``built`` holds the task's batches before the one that failed: still good.
    """

    def __init__(self, message: str, built: Sequence[BuiltBatch] = ()) -> None:
        super().__init__(message)
        self.built = list(built)


class TaskTimedOut(BuildError):
    """A worker spent more than ``task_timeout_seconds`` on one batch and was killed."""


class ExecutorFailed(Unavailable):
    """The executor cannot build batches now: no worker can be started, or a pool thread failed."""


PoolClosed = ExecutorClosed
PoolFailed = ExecutorFailed
"""The local pool's names for them."""


@dataclass(frozen=True)
class BatchTask:
    """Batches of one stream for one executor task, built in order.

    ``batches`` are index lists; ``seed`` and ``epoch`` seed each sample's random
    transforms (with its index), so a batch is the same wherever it is built.
    """

    dataset: str
    batches: Sequence[Sequence[int]]
    seed: int = 0
    epoch: int = 0


@dataclass
class BuiltBatch:
    """A finished batch: its header and its payload, which it owns until ``release``.

    The payload may be a view of shared memory (the local pool maps its workers'
    files); ``release`` gives that memory back at once, so no traceback or frame
    that still names the batch keeps it. Release each batch once it is sent or
    dropped; a released batch has an empty payload.
    """

    header: pb.BatchHeader
    payload: memoryview
    build_seconds: float
    file: tuple[str, int] | None = None
    """Where the payload also lies, (payload file, offset): the stream reads it from there
    (``wire.FileSlice``). None: in memory only."""
    shared: bool = False
    """A copy of a batch built for another stream (``shared_builds``): its build is not
    this stream's, so metrics count it once, where it was built."""

    def release(self) -> None:
        payload, self.payload = self.payload, memoryview(b"")
        with contextlib.suppress(BufferError):  # exported elsewhere: freed with that export
            payload.release()


def release_all(batches: Iterator[BuiltBatch] | Sequence[BuiltBatch]) -> None:
    for batch in batches:
        batch.release()


@dataclass
class Task:
    task_id: int
    dataset: str
    batches: Sequence[Sequence[int]]
    future: Future[list[BuiltBatch]]
    seed: int = 0
    epoch: int = 0
    attempts: int = 0
    path: str = ""
    """The payload file its worker writes (chosen when it is sent)."""


def first_sample(task: Task, batch: int = 0) -> str:
    """Names batch ``batch`` of ``task`` in an error message."""
    return f"the batch starting at sample index {int(task.batches[batch][0])}"


def settle(
    future: Future[list[BuiltBatch]],
    result: list[BuiltBatch] | None = None,
    *,
    exception: BaseException | None = None,
) -> None:
    """Resolves ``future`` unless it is already done (cancelled by its stream, or failed)."""
    with contextlib.suppress(InvalidStateError):
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


def split(task: Task, task_ids: Iterator[int]) -> list[Task]:
    """One task per batch of ``task``, which resolve ``task.future`` together.

    For a grouped task whose worker died (a segfault, ``os._exit``): rebuilt one
    batch per task, the batches before the item that kills its worker still
    arrive, and only the batch holding it fails (naming its samples).
    ``task.future`` resolves as soon as its outcome is known: all parts built,
    or the first part that failed (with the batches before it).
    """
    parts = [
        Task(next(task_ids), task.dataset, [batch], Future(), task.seed, task.epoch, task.attempts)
        for batch in task.batches
    ]

    def gather(_: Future[list[BuiltBatch]]) -> None:
        built: list[BuiltBatch] = []
        for part in parts:
            if not part.future.done() or part.future.cancelled():
                return  # not known yet, or the whole task was cancelled
            failure = part.future.exception()
            if isinstance(failure, Unavailable):
                outcome: BaseException | None = failure  # UNAVAILABLE: resumed elsewhere
            elif failure is not None:
                outcome = BatchFailed(str(failure), [*built, *getattr(failure, "built", ())])
            else:
                built += part.future.result()
                continue
            settle(task.future, exception=outcome)
            break
        else:
            settle(task.future, built)
        # Emptied first: no cycle through the callbacks keeps their mapped batches alive,
        # and the cancels below (which call back here) find nothing left to do.
        rest, parts[:] = list(parts), []
        for part in rest:
            part.future.cancel()  # not needed any more (a no-op on those done)

    def cancel_parts(future: Future[list[BuiltBatch]]) -> None:
        if future.cancelled():
            for part in list(parts):
                part.future.cancel()

    task.future.add_done_callback(cancel_parts)
    for part in list(parts):
        part.future.add_done_callback(gather)
    return parts
