"""A pool of worker processes that build whole batches into shared memory.

Why processes made once: loading and collating is CPU-bound Python, and
creating a worker per request would re-import torch and re-open datasets each
time (the slow first batch of a fresh DataLoader). Workers come from a
forkserver started before any gRPC thread exists, so a replacement is forked
from a clean, pre-imported parent in milliseconds.

Why one shared queue, and at most ``AHEAD`` tasks in each worker's pipe: a
task that has not reached a worker can still be dropped. A stream that ends
(cancelled, aborted, drained) cancels its futures, and the pool skips a
cancelled task instead of sending it, so a client that opens and cancels
streams cannot fill the workers with batches nobody wants. A few tasks
waiting in the pipe behind the one being built keep a worker from idling
between batches.

Why one pipe and one feeder thread per worker: the pool knows which tasks
each worker holds, so when a worker dies (segfault, OOM kill, ``os._exit``)
its tasks go back to the front of the queue for its replacement, and a worker
that dies mid-write cannot leave a shared lock held. A task's index list can
exceed the pipe buffer, so a send may block until the worker finishes its
current batch; only that worker's feeder waits. The collector thread (replies
and deaths) never sends a task, so it keeps collecting from every worker.

A worker that holds one batch longer than ``task_timeout_seconds`` (an item
that hangs) is SIGKILLed: Python cannot interrupt the item's code any other
way. That batch fails, naming the dataset and its first sample, and is not
retried (it would hang the replacement too); the worker's other tasks are
re-queued.

Finished payloads travel as files in /dev/shm: the worker writes the batch
once, the gRPC process maps the file and frames chunks straight from it, and
the file is reused for a later task once unmapped (``_payloads``). The pool
removes a task's file whenever the batch will not be mapped (the worker
reported an error, died, or its stream ended first), its free files when idle,
all of its files at close, and at start the files of servers that died without
closing (a pid in the name that is no longer running).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from batchwire.server import _worker
from batchwire.server._fastpath import IDLE_SECONDS
from batchwire.server._payloads import PayloadFiles, default_shm_dir
from batchwire.server.config import Config
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""A task whose worker dies this many times while building it fails instead of killing a fourth."""

AHEAD = 4
"""Tasks sent to one worker at a time: the one it builds and the next ones, in its pipe.

Each reply wakes the collector, then a feeder, before the next send: with only 2
ahead, small batches (``batchwire bench``, digits, batch 64, 2 workers) streamed
at 260 batches/s per client instead of 630; with 4, 580.
"""


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
    batches: Sequence[Sequence[int]]
    future: Future[list[BuiltBatch]]
    seed: int = 0
    epoch: int = 0
    attempts: int = 0
    path: str = ""
    """The payload file its worker writes (chosen when it is sent)."""


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Connection
    tasks: dict[int, _Task] = field(default_factory=dict)
    """Sent and not answered yet, oldest (the one being built) first; at most ``AHEAD``."""
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while sending on, or closing, ``conn``."""
    busy_since: float = 0.0
    """When it started building its oldest task (``time.monotonic``)."""
    stuck: _Task | None = None
    """The task it was killed for holding past ``task_timeout_seconds``."""


class WorkerPool:
    """Builds batches in ``num_workers`` processes; ``submit`` returns a Future.

    Cancelling the future before a worker starts the batch drops the task.
    """

    def __init__(self, config: Config, num_workers: int, *, shm_dir: str = "") -> None:
        if num_workers <= 0:
            raise ValueError(
                f"num_workers should be a positive integer, but got num_workers={num_workers}"
            )
        self._config = config
        self._num_workers = num_workers
        self._files = PayloadFiles(shm_dir or default_shm_dir(), self)
        self._task_timeout = config.server.task_timeout_seconds
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload(["batchwire.server._worker"])
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # queue or a worker's load changed
        self._queue: deque[_Task] = deque()
        self._workers: list[_Worker] = []
        self._task_ids = itertools.count()
        self._closed = False
        self._wake_reader, self._wake_writer = mp.Pipe(duplex=False)
        self._collector = threading.Thread(target=self._collect, name="batchwire-pool", daemon=True)
        self._feeders = [
            threading.Thread(target=self._feed, args=(slot,), name=f"batchwire-feed-{slot}")
            for slot in range(num_workers)
        ]
        self._idle_since: float | None = None  # when the last task finished (collector only)
        self.replaced = 0
        """Workers replaced after dying (for metrics and tests)."""

    def start(self) -> None:
        self._files.remove_leftovers()
        with self._lock:
            self._workers = [self._spawn(slot) for slot in range(self._num_workers)]
        self._collector.start()
        for feeder in self._feeders:
            feeder.daemon = True
            feeder.start()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [worker.process.pid for worker in self._workers]

    @property
    def size(self) -> int:
        with self._lock:
            return sum(worker.process.is_alive() for worker in self._workers)

    @property
    def queued(self) -> int:
        """Tasks waiting for a worker (cancelled ones included until a feeder skips them)."""
        with self._lock:
            return len(self._queue)

    def submit(
        self,
        dataset: str,
        batches: Sequence[Sequence[int]],
        *,
        seed: int = 0,
        epoch: int = 0,
    ) -> Future[list[BuiltBatch]]:
        """Queues one task: ``batches`` (index lists), built in order by one worker.

        The future resolves to one ``BuiltBatch`` per batch, or raises why not
        (``BatchFailed`` keeps the batches before the one that failed). Several
        small batches per task share the worker's per-task costs (pipe messages,
        one payload file and mapping). ``seed`` and ``epoch`` seed the random
        transforms of each sample (with its index).
        """
        if not batches:
            raise ValueError("a task needs at least one batch")
        task = _Task(next(self._task_ids), dataset, batches, Future(), seed, epoch)
        with self._lock:
            if self._closed:
                task.future.set_exception(PoolClosed("the server is shutting down"))
            else:
                self._queue.append(task)
                self._changed.notify_all()
        return task.future

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

    # -- the feeder threads (one per worker slot) --------------------------------

    def _feed(self, slot: int) -> None:
        while True:
            with self._changed:
                while True:
                    if self._closed:
                        return
                    worker = self._workers[slot]
                    task = self._next_task() if self._has_room(worker) else None
                    if task is not None:
                        break
                    self._changed.wait()
                if not worker.tasks:
                    worker.busy_since = time.monotonic()
                worker.tasks[task.task_id] = task
                task.path = self._files.take()
                self._changed.notify_all()  # other feeders may now send ahead
            message = (
                task.task_id,
                task.dataset,
                task.batches,
                task.path,
                task.seed,
                task.epoch,
            )
            try:
                with worker.send_lock:  # may block until the worker finishes its current batch
                    worker.conn.send(message)
            except (BrokenPipeError, OSError):
                pass  # the worker died (or was replaced): the collector re-queues its tasks

    def _has_room(self, worker: _Worker) -> bool:
        # An idle worker takes a task; a busy one takes a second only when no worker is
        # idle, so that a few tasks spread over the workers instead of queueing on one.
        if worker.stuck is not None:
            return False  # killed; its replacement is on the way
        if not worker.tasks:
            return True
        return len(worker.tasks) < AHEAD and all(other.tasks for other in self._workers)

    def _next_task(self) -> _Task | None:
        """The oldest queued task whose future is not cancelled (holding ``_lock``)."""
        while self._queue:
            task = self._queue.popleft()
            if not task.future.cancelled():
                return task
        return None

    # -- the collector thread -------------------------------------------------

    def _collect(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                by_conn = {worker.conn: worker for worker in self._workers}
                by_sentinel = {worker.process.sentinel: worker for worker in self._workers}
                deadlines = [
                    worker.busy_since + self._task_timeout
                    for worker in self._workers
                    if worker.tasks and worker.stuck is None
                ]
            timeout = min([1.0, *(deadline - time.monotonic() for deadline in deadlines)])
            ready = wait([*by_conn, *by_sentinel, self._wake_reader], timeout=max(timeout, 0.0))
            for conn in ready:
                if conn in by_conn:
                    self._receive(by_conn[conn])
            for sentinel in ready:
                if sentinel in by_sentinel:
                    self._replace(by_sentinel[sentinel])
            self._kill_stuck()
            self._trim_when_idle()

    def _trim_when_idle(self) -> None:
        """Gives free payload files back once no task has been in flight for ``IDLE_SECONDS``."""
        with self._lock:
            busy = bool(self._queue) or any(worker.tasks for worker in self._workers)
        now = time.monotonic()
        if busy or self._idle_since is None:
            self._idle_since = None if busy else now
        elif now - self._idle_since >= IDLE_SECONDS:
            self._files.trim()

    def _kill_stuck(self) -> None:
        """Kills each worker stuck on one task past the timeout; fails that task, not its others.

        The task is not retried: an item that hangs would hang the replacement too.
        The sentinel of the killed worker then fires and ``_replace`` re-queues the rest.
        """
        now = time.monotonic()
        stuck = []
        with self._lock:
            for worker in self._workers:
                late = now - worker.busy_since >= self._task_timeout
                if worker.tasks and late and worker.stuck is None:
                    worker.stuck = worker.tasks.pop(next(iter(worker.tasks)))
                    stuck.append((worker, worker.stuck))
        for worker, task in stuck:
            worker.process.kill()  # its partial payload goes once it is dead (``_replace``)
            indices = list(task.batches[0])
            message = (
                f"dataset {task.dataset!r}: the batch starting at sample index {indices[0]} "
                f"({len(indices)} samples, {len(task.batches)} batch(es) in the task) "
                "took longer than task_timeout_seconds="
                f"{self._task_timeout:g}; its worker (pid {worker.process.pid}) was killed"
            )
            log.warning("%s", message)
            _settle(task.future, exception=TaskTimedOut(message))

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._resolve(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass  # dead worker: its sentinel fires too

    def _resolve(self, worker: _Worker, reply: tuple[Any, ...]) -> None:
        task_id, headers, offsets, size, error, busy = reply
        with self._changed:
            task = worker.tasks.pop(task_id, None)
            if worker.tasks:
                worker.busy_since = time.monotonic()  # it starts on the next one now
            self._changed.notify_all()  # the worker has room for another task
        if task is None:
            return  # timed out as the worker finished it: its file went with the worker
        if task.future.cancelled() or not headers:
            # Its stream ended while it was built, or nothing good came of it.
            self._files.discard(task.path)
            if not headers:
                _settle(task.future, exception=BatchFailed(error or "the worker built nothing"))
            return
        try:
            payload = self._files.open(task.path, size)
        except OSError as exc:
            self._files.discard(task.path)
            _settle(
                task.future,
                exception=RuntimeError(f"lost batch payload of dataset {task.dataset!r}: {exc}"),
            )
            return
        built = []
        for header_bytes, offset in zip(headers, offsets, strict=True):
            header = pb.BatchHeader.FromString(header_bytes)
            view = payload[offset : offset + header.payload_size]
            built.append(BuiltBatch(header, view, busy / len(headers)))
        del payload  # the slices keep the mapping alive, each as long as its batch
        if error is not None:
            _settle(task.future, exception=BatchFailed(error, built))
        else:
            _settle(task.future, built)

    def _replace(self, dead: _Worker) -> None:
        self._receive(dead)  # results it sent before dying still count
        dead.process.join(timeout=1.0)
        exitcode = dead.process.exitcode
        # Closed under the send lock, so no feeder sends on a closed handle. A feeder
        # sending to the dead worker fails at once (the pipe has no reader left), so
        # the collector waits here for a failing send at most, never for a batch.
        with dead.send_lock:
            dead.conn.close()
        with self._changed:
            if self._closed:
                return
            replacement = self._spawn(dead.slot)
            self._workers[self._workers.index(dead)] = replacement
            orphans = list(dead.tasks.values())
            dead.tasks.clear()
            failed = []
            # Only the oldest was being built; the others waited in the pipe. (A timed-out
            # worker's oldest task has already failed and left ``tasks``.)
            if orphans and dead.stuck is None:
                orphans[0].attempts += 1
                if orphans[0].attempts >= MAX_ATTEMPTS:
                    failed.append(orphans.pop(0))
            unfinished = [*failed, *orphans, *([dead.stuck] if dead.stuck is not None else [])]
            for task in unfinished:
                self._files.discard(task.path)  # partial payloads; a rebuild gets a new file
            self._queue.extendleft(reversed(orphans))  # first in line: their streams wait on them
            self.replaced += 1
            self._changed.notify_all()
        log.warning(
            "worker %s (pid %s) died with exit code %s; replaced it, rebuilding %d batch(es)",
            dead.slot,
            dead.process.pid,
            exitcode,
            len(orphans),
        )
        for task in failed:
            _settle(
                task.future,
                exception=WorkerCrashed(
                    f"dataset {task.dataset!r}: worker processes died {task.attempts} times while "
                    f"building the batch of sample indices {list(task.batches[0])[:8]}... "
                    f"(last exit code {exitcode})"
                ),
            )

    # -- shutdown ---------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stops the workers; pending futures fail with ``PoolClosed``."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
            unsent = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
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
            worker.conn.close()
        if self._collector.is_alive():
            self._collector.join(timeout=timeout)
        for task in [*unsent, *(task for worker in workers for task in worker.tasks.values())]:
            _settle(task.future, exception=PoolClosed("the server is shutting down"))
        self._files.close()


def _settle(
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
