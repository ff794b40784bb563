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
and deaths, seen through a pidfd: ``_workerproc``) never sends a task, so it
keeps collecting from every worker; a respawn thread starts replacements.

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

NOTE [ Supervision ]
The threads that move batches (the collector, the feeders) must not die
silently: a dead collector once left every stream of every dataset waiting
forever behind a health check that said SERVING (issue 17). So:

- a reply that cannot be turned into batches fails its own task, naming the
  dataset and the sample; the collector goes on;
- a worker that cannot be started again (EMFILE, a forkserver dying under the
  request) is retried with backoff; its tasks wait in the queue for any worker;
- with no worker left after ``RESPAWN_ATTEMPTS`` failed starts in a row, the
  pool reports itself failed (``failure``, ``on_health_change``): pending and
  new tasks fail with ``PoolFailed`` (UNAVAILABLE), health says NOT_SERVING;
  it keeps trying, and the first worker that starts makes it healthy again;
- any other error in a pool thread is logged and the thread goes on; after
  ``THREAD_FAILURES`` in a row the pool fails for good (a bug: its state is no
  longer trusted), which ends every stream with a status instead of a hang.
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing as mp
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from batchwire.server import _worker
from batchwire.server._fastpath import IDLE_SECONDS
from batchwire.server._payloads import PayloadFiles, default_shm_dir
from batchwire.server._tasks import (
    BatchFailed,
    BuiltBatch,
    PoolClosed,
    PoolFailed,
    Task,
    TaskTimedOut,
    WorkerCrashed,
    first_sample,
    settle,
    split,
)
from batchwire.server._workerproc import WorkerProcess, start_worker
from batchwire.server.config import Config
from batchwire.v1 import batchwire_pb2 as pb

__all__ = [
    "AHEAD",
    "BatchFailed",
    "BuiltBatch",
    "HealthListener",
    "PoolClosed",
    "PoolFailed",
    "TaskTimedOut",
    "WorkerCrashed",
    "WorkerPool",
]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""A task whose worker dies this many times while building it fails instead of killing a fourth."""

AHEAD = 4
"""Tasks sent to one worker at a time: the one it builds and the next ones, in its pipe.

Each reply wakes the collector, then a feeder, before the next send: with only 2
ahead, small batches (``batchwire bench``, digits, batch 64, 2 workers) streamed
at 260 batches/s per client instead of 630; with 4, 580.
"""


RESPAWN_DELAYS = (0.1, 5.0)
"""Seconds before the first retry of a failed worker start, and the most between retries."""

RESPAWN_ATTEMPTS = 5
"""Failed starts in a row, with no worker left, after which the pool reports itself failed.

With ``RESPAWN_DELAYS`` that is about 1.5 s of retries (plus the starts themselves)."""

THREAD_FAILURES = 3
"""Unexpected errors in a row after which a pool thread stops and the pool fails for good."""

HealthListener = Callable[[str | None], None]
"""Called with the pool's ``failure`` (None: healthy again) each time it changes."""


@dataclass
class _Worker:
    slot: int
    proc: WorkerProcess
    tasks: dict[int, Task] = field(default_factory=dict)
    """Sent and not answered yet, oldest (the one being built) first; at most ``AHEAD``."""
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while sending on, or closing, ``conn``."""
    busy_since: float = 0.0
    """When it started building its oldest task (``time.monotonic``)."""
    stuck: Task | None = None
    """The task it was killed for holding past ``task_timeout_seconds``."""
    retired: bool = False
    """It died and its tasks went back to the queue; its slot waits for a new worker."""

    @property
    def conn(self) -> Connection:
        return self.proc.conn


@dataclass
class _Respawn:
    """A slot whose worker died: when to try starting a new one, and how often it failed."""

    due: float
    attempts: int = 0


class WorkerPool:
    """Builds batches in ``num_workers`` processes; ``submit`` returns a Future.

    Cancelling the future before a worker starts the batch drops the task.
    Health: ``failure`` and ``on_health_change`` (see NOTE [ Supervision ]).
    """

    def __init__(self, config: Config, num_workers: int, *, shm_dir: str = "") -> None:
        if num_workers <= 0:
            raise ValueError(
                f"num_workers should be a positive integer, but got num_workers={num_workers}"
            )
        self._config = config
        self._num_workers = num_workers
        self._files = PayloadFiles(
            shm_dir or default_shm_dir(), self, group=config.server.shm_group
        )
        self._task_timeout = config.server.task_timeout_seconds
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload(["batchwire.server._worker"])
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # queue or a worker's load changed
        # A slot to restart, or the pool closed or broken: its own condition, so that the
        # respawn thread does not wake for every task sent and finished.
        self._respawn_due = threading.Condition(self._lock)
        self._queue: deque[Task] = deque()
        self._workers: list[_Worker] = []
        self._respawns: dict[int, _Respawn] = {}  # slot -> its next start
        self._task_ids = itertools.count()
        self._closed = False
        self._failure: str | None = None
        self._broken = False  # a pool thread gave up: the failure is for good
        self._listeners: list[HealthListener] = []
        self._wake_reader, self._wake_writer = mp.Pipe(duplex=False)
        self._collector = threading.Thread(
            target=self._supervise, args=("collector", self._collect), name="batchwire-pool"
        )
        self._feeders = [
            threading.Thread(
                target=self._supervise,
                args=(f"feeder {slot}", lambda slot=slot: self._feed(slot)),
                name=f"batchwire-feed-{slot}",
            )
            for slot in range(num_workers)
        ]
        self._respawner = threading.Thread(
            target=self._supervise, args=("respawn", self._respawn), name="batchwire-respawn"
        )
        self._idle_since: float | None = None  # when the last task finished (collector only)
        self._collected = False  # the GC ran in this idle spell (collector only)
        self.replaced = 0
        """Workers replaced after dying (for metrics and tests)."""

    def start(self) -> None:
        self._files.remove_leftovers()
        with self._lock:
            self._workers = [
                _Worker(slot, self._start_worker(slot)) for slot in range(self._num_workers)
            ]
        for thread in [self._collector, self._respawner, *self._feeders]:
            thread.daemon = True
            thread.start()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [worker.proc.pid for worker in self._workers if not worker.retired]

    @property
    def size(self) -> int:
        with self._lock:  # ``_retire`` closes a pidfd only under it
            return sum(not worker.proc.exited() for worker in self._workers)

    @property
    def queued(self) -> int:
        """Tasks waiting for a worker (cancelled ones included until a feeder skips them)."""
        with self._lock:
            return len(self._queue)

    # -- health -------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the pool cannot build batches now; None while it can (see NOTE [ Supervision ])."""
        with self._lock:
            return self._failure

    def on_health_change(self, listener: HealthListener) -> None:
        """Calls ``listener(failure)`` now and on each change of ``failure``.

        It runs in a pool thread, with no pool lock held: it must not block (an asyncio
        server hands the change to its loop with ``call_soon_threadsafe``).
        """
        with self._lock:
            self._listeners.append(listener)
            failure = self._failure
        self._notify([listener], failure)

    def _set_failure(self, failure: str | None, *, for_good: bool = False) -> None:
        """Turns the pool failed (pending tasks fail with ``PoolFailed``) or healthy again."""
        with self._changed:
            if failure is None and (self._broken or self._failure is None):
                return  # healthy already, or failed for good
            changed = (failure is None) != (self._failure is None)
            self._failure = failure
            self._broken = self._broken or for_good
            doomed = []
            if failure is not None:
                doomed, self._queue = list(self._queue), deque()
            if for_good:  # their replies may never be read; a late one just discards its file
                doomed += [task for worker in self._workers for task in worker.tasks.values()]
            listeners = list(self._listeners) if changed else []
            self._changed.notify_all()
            self._respawn_due.notify_all()
        for task in doomed:
            settle(task.future, exception=PoolFailed(failure))
        if changed:
            if failure is None:
                log.warning("the worker pool has recovered: serving again")
            else:
                log.error("the worker pool has failed: %s", failure)
        self._notify(listeners, failure)

    @staticmethod
    def _notify(listeners: list[HealthListener], failure: str | None) -> None:
        for listener in listeners:
            try:
                listener(failure)
            except Exception:
                log.exception("a pool health listener failed")

    # -- tasks ----------------------------------------------------------------------

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
        transforms of each sample (with its index). A failed pool fails the
        future at once with ``PoolFailed``.
        """
        if not batches:
            raise ValueError("a task needs at least one batch")
        task = Task(next(self._task_ids), dataset, batches, Future(), seed, epoch)
        with self._lock:
            if self._closed:
                task.future.set_exception(PoolClosed("the server is shutting down"))
            elif self._failure is not None:
                task.future.set_exception(PoolFailed(self._failure))
            else:
                self._queue.append(task)
                self._changed.notify_all()
        return task.future

    def _start_worker(self, slot: int) -> WorkerProcess:
        return start_worker(
            self._context, _worker.run, (self._config,), name=f"batchwire-worker-{slot}"
        )

    # -- supervision (see NOTE [ Supervision ]) -----------------------------------------

    def _supervise(self, name: str, step: Callable[[], bool]) -> None:
        """Runs ``step`` until it returns False (the pool closed); survives its errors."""
        failures = 0
        try:
            while True:
                try:
                    if not step():
                        return
                    failures = 0
                except Exception as exc:
                    failures += 1
                    log.exception("worker pool: the %s thread failed (%d in a row)", name, failures)
                    if failures >= THREAD_FAILURES:
                        reason = (
                            f"its {name} thread failed {failures} times in a row, last: {exc!r}"
                        )
                        self._set_failure(reason, for_good=True)
                        return
                    time.sleep(0.1 * failures)
        except BaseException as exc:  # not an Exception: the thread ends, the pool says so
            self._set_failure(f"its {name} thread stopped: {exc!r}", for_good=True)
            raise

    # -- the feeder threads (one per worker slot) --------------------------------

    def _feed(self, slot: int) -> bool:
        """Sends one task to the worker of ``slot``; False once the pool is closed or broken."""
        with self._changed:
            while True:
                if self._closed or self._broken:
                    return False
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
        message = (task.task_id, task.dataset, task.batches, task.path, task.seed, task.epoch)
        try:
            with worker.send_lock:  # may block until the worker finishes its current batch
                worker.conn.send(message)
        except OSError:
            pass  # the worker died (or was replaced): the collector re-queues its tasks
        except Exception as exc:
            # Half a message may sit in the pipe: this task fails, the worker is replaced.
            with self._changed:
                worker.tasks.pop(task.task_id, None)
                worker.proc.kill()
            self._files.discard(task.path)
            message = f"dataset {task.dataset!r}, {first_sample(task)}: cannot send the task"
            settle(task.future, exception=RuntimeError(f"{message} to a worker: {exc!r}"))
        return True

    def _has_room(self, worker: _Worker) -> bool:
        # An idle worker takes a task; a busy one takes a second only when no worker is
        # idle, so that a few tasks spread over the workers instead of queueing on one.
        if worker.retired or worker.stuck is not None:
            return False  # dead or killed; its replacement is on the way
        if not worker.tasks:
            return True
        live = [other for other in self._workers if not other.retired]
        return len(worker.tasks) < AHEAD and all(other.tasks for other in live)

    def _next_task(self) -> Task | None:
        """The oldest queued task whose future is not cancelled (holding ``_lock``)."""
        while self._queue:
            task = self._queue.popleft()
            if not task.future.cancelled():
                return task
        return None

    # -- the collector thread -------------------------------------------------

    def _collect(self) -> bool:
        """One round: replies, deaths, restarts, timeouts; False once the pool is closed."""
        with self._lock:
            if self._closed or self._broken:
                return False
            live = [worker for worker in self._workers if not worker.retired]
            by_conn = {worker.conn: worker for worker in live}
            by_sentinel = {worker.proc.sentinel: worker for worker in live}
            deadlines = [
                worker.busy_since + self._task_timeout
                for worker in live
                if worker.tasks and worker.stuck is None
            ]
        timeout = min([1.0, *(deadline - time.monotonic() for deadline in deadlines)])
        ready = wait([*by_conn, *by_sentinel, self._wake_reader], timeout=max(timeout, 0.0))
        while self._wake_reader in ready and self._wake_reader.poll():
            self._wake_reader.recv()  # a new worker to watch: the next round does
        for conn in ready:
            if conn in by_conn:
                self._receive(by_conn[conn])
        for sentinel in ready:
            if sentinel in by_sentinel:
                self._retire(by_sentinel[sentinel])
        self._kill_stuck()
        self._trim_when_idle()
        return True

    def _trim_when_idle(self) -> None:
        """Gives free payload files back once no task has been in flight for ``IDLE_SECONDS``.

        Once per idle spell it first runs the cyclic GC: a batch still referenced from a
        reference cycle (an aborted stream's exception and its frames) keeps its file
        mapped until the GC runs, and an idle server may not run it for hours.
        """
        with self._lock:
            busy = bool(self._queue) or any(worker.tasks for worker in self._workers)
        now = time.monotonic()
        if busy or self._idle_since is None:
            self._idle_since = None if busy else now
            self._collected = False
        elif now - self._idle_since >= IDLE_SECONDS:
            if not self._collected:
                gc.collect()
                self._collected = True
            self._files.trim()

    def _kill_stuck(self) -> None:
        """Kills each worker stuck on one task past the timeout; fails that task, not its others.

        The task is not retried: an item that hangs would hang the replacement too.
        The killed worker's pidfd then fires and ``_retire`` re-queues the rest.
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
            worker.proc.kill()  # its partial payload goes once it is dead (``_retire``)
            indices = list(task.batches[0])
            message = (
                f"dataset {task.dataset!r}: the batch starting at sample index {indices[0]} "
                f"({len(indices)} samples, {len(task.batches)} batch(es) in the task) "
                "took longer than task_timeout_seconds="
                f"{self._task_timeout:g}; its worker (pid {worker.proc.pid}) was killed"
            )
            log.warning("%s", message)
            settle(task.future, exception=TaskTimedOut(message))

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._resolve(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass  # dead worker: its pidfd fires too

    def _resolve(self, worker: _Worker, reply: tuple[Any, ...]) -> None:
        task_id, headers, offsets, size, error, busy = reply
        with self._changed:
            task = worker.tasks.pop(task_id, None)
            if worker.tasks:
                worker.busy_since = time.monotonic()  # it starts on the next one now
            self._changed.notify_all()  # the worker has room for another task
        if task is None:
            return  # timed out as the worker finished it: its file went with the worker
        try:
            self._deliver(task, headers, offsets, size, error, busy)
        except Exception as exc:  # this reply fails its task, not the collector
            log.exception("dataset %r: cannot take a built batch", task.dataset)
            self._files.discard(task.path)
            message = f"dataset {task.dataset!r}, {first_sample(task)}: cannot take the built batch"
            settle(task.future, exception=RuntimeError(f"{message}: {exc!r}"))

    def _deliver(
        self,
        task: Task,
        headers: list[bytes],
        offsets: list[int],
        size: int,
        error: str | None,
        busy: float,
    ) -> None:
        """Maps a task's payload file and resolves its future with the batches in it."""
        parsed = []
        for header_bytes in headers:
            try:
                parsed.append(pb.BatchHeader.FromString(header_bytes))
            except Exception as exc:  # the worker's checks let through what protobuf refuses
                error = (
                    f"dataset {task.dataset!r}, {first_sample(task, len(parsed))}: "
                    f"its header cannot be decoded: {exc!r}"
                )
                break
        if task.future.done() or not parsed:
            # Its stream ended while it was built, or nothing good came of it.
            self._files.discard(task.path)
            if not parsed:
                settle(task.future, exception=BatchFailed(error or "the worker built nothing"))
            return
        try:
            payload = self._files.open(task.path, size)
        except OSError as exc:
            self._files.discard(task.path)
            settle(
                task.future,
                exception=RuntimeError(f"lost batch payload of dataset {task.dataset!r}: {exc}"),
            )
            return
        built = []
        for header, offset in zip(parsed, offsets, strict=False):
            view = payload[offset : offset + header.payload_size]
            built.append(BuiltBatch(header, view, busy / len(headers), (task.path, offset)))
        del payload  # the slices keep the mapping alive, each as long as its batch
        if error is not None:
            settle(task.future, exception=BatchFailed(error, built))
        else:
            settle(task.future, built)

    # -- deaths and restarts ------------------------------------------------------

    def _retire(self, dead: _Worker) -> None:
        """A worker exited: its tasks go back to the queue, and a restart is due now."""
        self._receive(dead)  # results it sent before dying still count
        exitcode = dead.proc.exitcode(timeout=1.0)
        # Closed under the send lock, so no feeder sends on a closed handle. A feeder
        # sending to the dead worker fails at once (the pipe has no reader left), so
        # the collector waits here for a failing send at most, never for a batch.
        with dead.send_lock:
            dead.conn.close()
        with self._changed:
            dead.proc.release()
            dead.retired = True
            orphans = list(dead.tasks.values())
            dead.tasks.clear()
            failed = []
            # Only the oldest was being built; the others waited in the pipe. (A timed-out
            # worker's oldest task has already failed and left ``tasks``.)
            unfinished = [*orphans, *([dead.stuck] if dead.stuck is not None else [])]
            for task in unfinished:
                self._files.discard(task.path)  # partial payloads; a rebuild gets a new file
            if orphans and dead.stuck is None:
                orphans[0].attempts += 1
                if len(orphans[0].batches) > 1:  # rebuilt a batch per task: see ``split``
                    orphans[:1] = split(orphans[0], self._task_ids)
                elif orphans[0].attempts >= MAX_ATTEMPTS:
                    failed.append(orphans.pop(0))
            self._queue.extendleft(reversed(orphans))  # first in line: their streams wait on them
            if not self._closed:
                self._respawns[dead.slot] = _Respawn(due=time.monotonic())
                self._respawn_due.notify_all()
            self.replaced += 1
            self._changed.notify_all()
        log.warning(
            "worker %s (pid %s) died with exit code %s; replacing it, rebuilding %d batch(es)",
            dead.slot,
            dead.proc.pid,
            exitcode,
            len(orphans),
        )
        for task in failed:
            settle(
                task.future,
                exception=WorkerCrashed(
                    f"dataset {task.dataset!r}: worker processes died {task.attempts} times while "
                    "building the batch of sample indices "
                    f"{[int(index) for index in task.batches[0][:8]]}... "
                    f"(last exit code {exitcode})"
                ),
            )

    # -- the respawn thread: starting a worker can take seconds (a new forkserver imports
    # torch), so it never holds up the collector --------------------------------------

    def _respawn(self) -> bool:
        """Starts a worker in each empty slot whose time has come; False once closed."""
        with self._respawn_due:
            while True:
                if self._closed or self._broken:
                    return False
                now = time.monotonic()
                due = [slot for slot, respawn in self._respawns.items() if respawn.due <= now]
                if due:
                    break
                waits = [respawn.due - now for respawn in self._respawns.values()]
                self._respawn_due.wait(min(waits) if waits else None)
        for slot in due:
            try:
                proc = self._start_worker(slot)
            except Exception as exc:  # EMFILE, a forkserver dying under the request, ...
                self._respawn_failed(slot, exc)
                continue
            with self._changed:
                closed = self._closed
                if not closed:
                    attempts = self._respawns.pop(slot).attempts
                    self._workers[slot] = _Worker(slot, proc)
                    self._changed.notify_all()
            if closed:
                proc.kill()
                proc.conn.close()
                proc.release()
                return False
            self._wake_writer.send(None)  # the collector watches the new worker from now on
            if attempts:
                log.warning("worker %s started after %d failed attempt(s)", slot, attempts)
            self._set_failure(None)
        return True

    def _respawn_failed(self, slot: int, exc: Exception) -> None:
        first, most = RESPAWN_DELAYS
        with self._lock:
            respawn = self._respawns.get(slot)
            if respawn is None:
                return  # closed meanwhile
            respawn.attempts += 1
            attempts = respawn.attempts
            delay = min(most, first * 2 ** (attempts - 1))
            respawn.due = time.monotonic() + delay
            stranded = all(worker.retired for worker in self._workers)
        cause = f"{type(exc).__name__}: {exc}"
        log.warning(
            "respawning worker %s failed (attempt %d): %s; retrying in %.1fs",
            slot,
            attempts,
            cause,
            delay,
        )
        if stranded and attempts >= RESPAWN_ATTEMPTS:
            self._set_failure(
                f"the worker pool has no worker left: starting one failed {attempts} times "
                f"in a row, last with {cause}"
            )

    # -- shutdown ---------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stops the workers; pending futures fail with ``PoolClosed``."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            workers = [worker for worker in self._workers if not worker.retired]
            unsent = list(self._queue)
            self._queue.clear()
            self._respawns.clear()
            self._changed.notify_all()
            self._respawn_due.notify_all()
        self._wake_writer.send(None)
        for worker in workers:
            try:
                with worker.send_lock:
                    worker.conn.send(None)
            except OSError:
                pass
        if self._collector.is_alive():
            self._collector.join(timeout=timeout)
        for worker in workers:
            # Its files go only once it has exited: it may be writing one now.
            if not worker.proc.exited(timeout):
                worker.proc.kill()
                worker.proc.exited(timeout)
            worker.conn.close()
            worker.proc.release()
        with self._lock:  # the collector may have re-queued a dead worker's tasks meanwhile
            unsent += self._queue
            unsent += [task for worker in self._workers for task in worker.tasks.values()]
        for task in unsent:
            settle(task.future, exception=PoolClosed("the server is shutting down"))
        self._files.close()
