"""What the pool hands out and keeps per task: finished batches, task records, and failures.

Each failure is its own type, so that the service maps it to one gRPC status
(``service.py``): ``BatchFailed``, ``WorkerCrashed`` and ``TaskTimedOut`` end a
stream with INTERNAL, ``PoolClosed`` and ``PoolFailed`` with UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from batchwire.v1 import batchwire_pb2 as pb


class WorkerCrashed(RuntimeError):
    """Workers kept dying while building one batch."""


class PoolClosed(RuntimeError):
    """The pool was shut down before the batch was built."""


class BatchFailed(RuntimeError):
    """The worker reported an error building a batch (message says which sample).

    ``built`` holds the task's batches before the one that failed: still good.
    """

    def __init__(self, message: str, built: Sequence[BuiltBatch] = ()) -> None:
        super().__init__(message)
        self.built = list(built)


class TaskTimedOut(RuntimeError):
    """A worker spent more than ``task_timeout_seconds`` on one batch and was killed."""


class PoolFailed(RuntimeError):
    """The pool cannot build batches now: no worker can be started, or a pool thread failed."""


@dataclass
class BuiltBatch:
    """A finished batch: its header and its payload, mapped from shared memory."""

    header: pb.BatchHeader
    payload: memoryview
    build_seconds: float


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
            if isinstance(failure, PoolClosed | PoolFailed):
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
