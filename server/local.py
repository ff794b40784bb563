"""The local executor: this machine's worker processes (``pool.WorkerPool``) behind ``Executor``.

The pool does the work (forkserver workers, payload files in /dev/shm mapped
here, supervision); this adds what only the local pool knows: how many small
batches are worth one of its tasks, and how to warm each of its workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Future

from batchwire.server._tasks import BatchTask, BuiltBatch
from batchwire.server.config import Config
from batchwire.server.executor import HealthListener
from batchwire.server.pool import WorkerPool

log = logging.getLogger(__name__)

TASK_BYTES = 8 << 20
TASK_SECONDS = 0.005
MAX_TASK_BATCHES = 16


def group_size(batch_bytes: int, build_seconds: float | None) -> int:
    """Batches per worker task: one, or several small quick ones.

    A task costs about half a millisecond of fixed CPU across the pool and the
    worker (pipe messages, thread hand-offs, creating and mapping a payload
    file): as much as building a 200 KB batch (benchmarks/RESULTS.md, mnist).
    Batches that are small (``TASK_BYTES`` hold several) and quick to build
    (``TASK_SECONDS`` hold several, by the last task's build time) share a task;
    slow ones go one per task, so their first batch and their latency do not
    wait on a group. Until a build time is known, one per task. ``TASK_BYTES``
    is 8 MiB, not 1: 16 mnist batches (200 KB) per task instead of 5 took the
    server's CPU per batch from ~190 to ~115 us and the client's from ~95 to
    ~70 us over shared memory (one task, one payload file, one mapping and one
    packed message per 16); two cifar batches (3.1 MB) per task instead of one
    took cifar over shared memory from ~1,150 to ~1,300 batches/s. 16 MiB was
    slower then (~700/s), until the stream held a task's worth more handles for a
    client working through a file (``shm_delivery.SharedStream.has_room``); since,
    12 and 16 MiB measure within the noise of 8 (1,600-1,880/s), so the smaller stays.
    """
    if batch_bytes <= 0 or build_seconds is None:
        return 1
    by_bytes = TASK_BYTES // batch_bytes
    by_time = int(TASK_SECONDS / max(build_seconds, 1e-6))
    return max(1, min(MAX_TASK_BATCHES, by_bytes, by_time))


class LocalExecutor:
    """``Executor`` over a ``WorkerPool`` of ``num_workers`` processes."""

    def __init__(self, config: Config, num_workers: int, *, shm_dir: str = "") -> None:
        self.pool = WorkerPool(config, num_workers, shm_dir=shm_dir)

    def start(self) -> None:
        self.pool.start()

    def warm_up(self, datasets: Iterable[str]) -> None:
        # One single-sample batch per worker and dataset: every worker imports
        # and opens its datasets now, not on some trainer's first batch.
        workers = len(self.pool.pids)
        pending = [
            (name, self.pool.submit(name, [[0]])) for name in datasets for _ in range(workers)
        ]
        for name, future in pending:
            try:
                future.result()
            except Exception as exc:  # a broken item fails its streams later, with INTERNAL
                log.warning("warm-up of dataset %r failed: %s", name, exc)

    def submit(self, task: BatchTask) -> Future[list[BuiltBatch]]:
        return self.pool.submit(task.dataset, task.batches, seed=task.seed, epoch=task.epoch)

    def group_size(self, batch_bytes: int, build_seconds: float | None) -> int:
        return group_size(batch_bytes, build_seconds)

    @property
    def failure(self) -> str | None:
        return self.pool.failure

    def on_health_change(self, listener: HealthListener) -> None:
        self.pool.on_health_change(listener)

    @property
    def size(self) -> int:
        return self.pool.size

    @property
    def replaced(self) -> int:
        return self.pool.replaced

    def close(self) -> None:
        self.pool.close()
