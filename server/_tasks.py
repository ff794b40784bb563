"""What the pool hands out and keeps per task: finished batches, task records, and failures.

Each failure is its own type, so that the service maps it to one gRPC status
(``service.py``): ``BatchFailed``, ``WorkerCrashed`` and ``TaskTimedOut`` end a
stream with INTERNAL, ``PoolClosed`` and ``PoolFailed`` with UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
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
