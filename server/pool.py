"""A pool of worker processes that build whole batches into shared memory.

Why processes made once: loading and collating is CPU-bound Python, and
creating a worker per request would re-import torch and re-open datasets each
time (the slow first batch of a fresh DataLoader). Workers come from a
forkserver started before any gRPC thread exists, so a replacement is forked
from a clean, pre-imported parent in milliseconds.

Why one pipe per worker (rather than one shared queue): the pool knows which
tasks each worker holds, so when a worker dies (segfault, OOM kill,
``os._exit``) its tasks are given to its replacement, and a worker that dies
mid-write cannot leave a shared lock held.

Finished payloads travel as files in /dev/shm: the worker writes the batch
once, the gRPC process maps the file and frames chunks straight from it.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import multiprocessing as mp
import os
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from batchwire.server import _worker
from batchwire.server.batches import open_payload
from batchwire.server.config import Config
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""A task whose worker dies this many times fails instead of killing a fourth."""


class WorkerCrashed(RuntimeError):
    """Workers kept dying while building one batch."""


class PoolClosed(RuntimeError):
    """The pool was shut down before the batch was built."""


@dataclass
class BuiltBatch:
    """A finished batch: its header and its payload, mapped from shared memory."""

    header: pb.BatchHeader
    payload: memoryview
    build_seconds: float


@dataclass
class _Task:
    task_id: int
    dataset: str
    indices: Sequence[int]
    future: Future[BuiltBatch]
    seed: int = 0
    epoch: int = 0
    attempts: int = 0


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Connection
    tasks: dict[int, _Task] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)


def default_shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class WorkerPool:
    """Builds batches in ``num_workers`` processes; ``submit`` returns a Future."""

    def __init__(self, config: Config, num_workers: int, *, shm_dir: str = "") -> None:
        if num_workers <= 0:
            raise ValueError(
                f"num_workers should be a positive integer, but got num_workers={num_workers}"
            )
        self._config = config
        self._num_workers = num_workers
        self._shm_dir = shm_dir or default_shm_dir()
        self._prefix = f"batchwire-{os.getpid()}-{id(self):x}-"
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload(["batchwire.server._worker"])
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._task_ids = itertools.count()
        self._closed = False
        self._wake_reader, self._wake_writer = mp.Pipe(duplex=False)
        self._collector = threading.Thread(target=self._collect, name="batchwire-pool", daemon=True)
        self.replaced = 0
        """Workers replaced after dying (for metrics and tests)."""
        self.busy_seconds = 0.0
        """Total time workers spent building batches."""

    def start(self) -> None:
        with self._lock:
            self._workers = [self._spawn(slot) for slot in range(self._num_workers)]
        self._collector.start()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [worker.process.pid for worker in self._workers]

    @property
    def size(self) -> int:
        with self._lock:
            return sum(worker.process.is_alive() for worker in self._workers)

    def submit(
        self, dataset: str, indices: Sequence[int], *, seed: int = 0, epoch: int = 0
    ) -> Future[BuiltBatch]:
        """Queues one batch; the future resolves to a ``BuiltBatch`` or raises why not.

        ``seed`` and ``epoch`` seed the random transforms of each sample (with its index).
        """
        task = _Task(next(self._task_ids), dataset, indices, Future(), seed, epoch)
        self._dispatch(task)
        return task.future

    def _dispatch(self, task: _Task) -> None:
        with self._lock:
            if self._closed:
                task.future.set_exception(PoolClosed("the server is shutting down"))
                return
            worker = min(self._workers, key=lambda w: len(w.tasks))
            worker.tasks[task.task_id] = task
        try:
            with worker.send_lock:
                worker.conn.send(
                    (
                        task.task_id,
                        task.dataset,
                        task.indices,
                        self._path(task.task_id),
                        task.seed,
                        task.epoch,
                    )
                )
        except (BrokenPipeError, OSError):
            pass  # the worker died; the collector hands its tasks to the replacement

    def _path(self, task_id: int) -> str:
        return os.path.join(self._shm_dir, f"{self._prefix}{task_id}")

    def _spawn(self, slot: int) -> _Worker:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker.run,
            args=(self._config, theirs),
            name=f"batchwire-worker-{slot}",
            daemon=True,
        )
        process.start()
        theirs.close()
        return _Worker(slot, process, ours)

    # -- the collector thread -------------------------------------------------

    def _collect(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                by_conn = {worker.conn: worker for worker in self._workers}
                by_sentinel = {worker.process.sentinel: worker for worker in self._workers}
            ready = wait([*by_conn, *by_sentinel, self._wake_reader], timeout=1.0)
            for conn in ready:
                if conn in by_conn:
                    self._receive(by_conn[conn])
            for sentinel in ready:
                if sentinel in by_sentinel:
                    self._replace(by_sentinel[sentinel])

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._resolve(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass  # dead worker: its sentinel fires too

    def _resolve(self, worker: _Worker, reply: tuple[Any, ...]) -> None:
        status, task_id = reply[0], reply[1]
        with self._lock:
            task = worker.tasks.pop(task_id, None)
        if task is None:
            return
        if not task.future.set_running_or_notify_cancel():
            _remove(self._path(task_id))  # its stream ended and cancelled it: nobody maps this
            return
        if status == "ok":
            header_bytes, size, busy = reply[2], reply[3], reply[4]
            self.busy_seconds += busy
            try:
                payload = open_payload(self._path(task_id), size)
            except OSError as exc:
                task.future.set_exception(
                    RuntimeError(f"lost batch payload of dataset {task.dataset!r}: {exc}")
                )
                return
            task.future.set_result(
                BuiltBatch(pb.BatchHeader.FromString(header_bytes), payload, busy)
            )
        else:
            task.future.set_exception(BatchFailed(reply[2]))

    def _replace(self, dead: _Worker) -> None:
        self._receive(dead)  # results it sent before dying still count
        dead.process.join(timeout=1.0)
        exitcode = dead.process.exitcode
        dead.conn.close()
        with self._lock:
            if self._closed:
                return
            replacement = self._spawn(dead.slot)
            self._workers[self._workers.index(dead)] = replacement
            orphans = list(dead.tasks.values())
            self.replaced += 1
        log.warning(
            "worker %s (pid %s) died with exit code %s; replaced it, rebuilding %d batch(es)",
            dead.slot,
            dead.process.pid,
            exitcode,
            len(orphans),
        )
        for task in orphans:
            _remove(self._path(task.task_id))
            task.attempts += 1
            if task.attempts >= MAX_ATTEMPTS:
                task.future.set_exception(
                    WorkerCrashed(
                        f"dataset {task.dataset!r}: worker processes died {task.attempts} times while "
                        f"building the batch of sample indices {list(task.indices)[:8]}... "
                        f"(last exit code {exitcode})"
                    )
                )
            else:
                self._dispatch(task)

    # -- shutdown ---------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stops the workers; pending futures fail with ``PoolClosed``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
        self._wake_writer.send(None)
        for worker in workers:
            try:
                with worker.send_lock:
                    worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in workers:
            worker.process.join(timeout=timeout)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=timeout)
            for task in worker.tasks.values():
                if not task.future.done():
                    task.future.set_exception(PoolClosed("the server is shutting down"))
            worker.conn.close()
        if self._collector.is_alive():
            self._collector.join(timeout=timeout)
        for path in glob.glob(os.path.join(self._shm_dir, f"{self._prefix}*")):
            _remove(path)


class BatchFailed(RuntimeError):
    """The worker reported an error building the batch (message says which sample)."""


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
