"""The seam between a stream and whatever builds its batches.

An ``Executor`` takes a ``BatchTask`` (a few index lists of one stream) and
returns a future of ``BuiltBatch`` es, in order; a failure arrives as one of
the typed failures of ``_tasks`` (``BuildError`` or ``Unavailable``), which the
service turns into a gRPC status through one table. The stream and the
service know only this interface: how batches are built (processes, threads,
a cluster) and where their bytes live until sent is the executor's business;
a built batch owns its memory until ``release``.

Engines, chosen by ``[server] executor``: ``local`` (``local.LocalExecutor``:
worker processes on this machine, payloads in /dev/shm) and ``ray``
(``ray_executor.RayExecutor``: actors of a Ray cluster);
``inprocess.ThreadExecutor`` builds in threads of the calling process (tests,
debugging a dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Protocol

from batchwire.server._tasks import (
    BatchFailed,
    BatchTask,
    BuildError,
    BuiltBatch,
    ExecutorClosed,
    ExecutorFailed,
    TaskTimedOut,
    Unavailable,
    WorkerCrashed,
)
from batchwire.server.config import Config, ConfigError

__all__ = [
    "BatchFailed",
    "BatchTask",
    "BuildError",
    "BuiltBatch",
    "Executor",
    "ExecutorClosed",
    "ExecutorFailed",
    "HealthListener",
    "TaskTimedOut",
    "Unavailable",
    "WorkerCrashed",
    "make_executor",
]

HealthListener = Callable[[str | None], None]
"""Called with the executor's ``failure`` (None: healthy again) each time it changes."""


class Executor(Protocol):
    """Builds batches for streams. Thread-safe: streams submit from any thread."""

    def start(self) -> None:
        """Starts the workers (the server's port is open, nothing is served yet)."""

    def warm_up(self, datasets: Iterable[str]) -> None:
        """Blocks until each worker has built one batch of each dataset (opened it)."""

    def submit(self, task: BatchTask) -> Future[list[BuiltBatch]]:
        """Queues ``task``; the future holds one ``BuiltBatch`` per batch, in order.

        It fails with ``BatchFailed`` (keeping the batches before the failed one),
        another ``BuildError``, or an ``Unavailable``. Cancelling it before the
        task is started drops the task.
        """
        ...

    def group_size(self, batch_bytes: int, build_seconds: float | None) -> int:
        """How many batches of ``batch_bytes`` taking ``build_seconds`` (None: not known
        yet) each are worth one task: the executor's own per-task cost decides."""
        ...

    @property
    def failure(self) -> str | None:
        """Why it cannot build batches now; None while it can."""
        ...

    def on_health_change(self, listener: HealthListener) -> None:
        """Calls ``listener(failure)`` now and at each change; it must not block."""

    @property
    def size(self) -> int:
        """Workers alive now (a stat for metrics and the start-up line)."""
        ...

    @property
    def replaced(self) -> int:
        """Workers that died and were replaced (a stat for metrics)."""
        ...

    def close(self) -> None:
        """Stops the workers; pending futures fail with ``ExecutorClosed``."""


def make_executor(config: Config, workers: int | None = None) -> Executor:
    """The executor ``[server] executor`` names, with ``workers`` (default: the config's)."""
    settings = config.server
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers should be a positive integer, but got workers={workers!r}")
    workers = settings.workers if workers is None else workers
    if settings.executor == "local":
        from batchwire.server.local import LocalExecutor

        return LocalExecutor(config, workers, shm_dir=settings.shm_dir)
    if settings.executor == "ray":
        try:
            from batchwire.server.ray_executor import RayExecutor
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise ConfigError(
                config.file, "server.executor", f"'ray' needs pip install 'batchwire[ray]' ({exc})"
            ) from exc
        return RayExecutor(config, workers)
    raise ValueError(f"unknown executor {settings.executor!r}")  # config.py checked it already
