"""Executor "ray": batches built by actors of a Ray cluster (optional extra ``batchwire[ray]``).

One actor per worker slot (``workers``), each holding its datasets' pipelines
(built once per actor, like a worker process). A thread per slot sends the
actor one task at a time and waits for it with ``task_timeout_seconds``:

- the actor answers: each batch's header and its payload as a numpy array,
  which travels through Ray's object store (zero-copy on the server's node);
- the actor is lost (its node removed, the process killed): a new actor is
  started and the task goes back to the front of the queue, to be rebuilt by
  whichever actor is free (same bytes: a batch is a pure function of its
  indices, seed and epoch); after ``MAX_ATTEMPTS`` losses the batch fails;
- the task times out: the actor is killed (Python cannot stop an item's code
  any other way), the batch fails naming dataset, sample and timeout, and a
  new actor takes the slot.

A slot whose new actor cannot be placed yet (the cluster lost the CPUs) takes
no task until it can, so its tasks go to the slots that can build them. When
no actor at all is alive and none could be placed for ``place_seconds``, the
executor reports itself failed (``failure``, ``on_health_change``: health says
NOT_SERVING), and queued and new tasks fail with ``ExecutorFailed``
(UNAVAILABLE, which clients retry) instead of waiting for a cluster that may
never come back; the first actor placed again makes it healthy.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchwire.server._tasks import (
    BatchFailed,
    BatchTask,
    BuiltBatch,
    ExecutorClosed,
    ExecutorFailed,
    TaskTimedOut,
    WorkerCrashed,
    settle,
)
from batchwire.server.config import Config
from batchwire.server.executor import HealthListener
from batchwire.server.local import group_size
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""A task whose actor is lost this many times fails instead of being sent a fourth time."""

PLACE_SECONDS = 30.0
"""With no actor alive, how long placing one may take before the executor reports itself failed."""

OBJECT_STORE_BYTES = 256 << 20
"""Object store of a Ray started by the server (Ray's minimum is 75 MiB)."""


class Builder:
    """The actor: builds tasks of any dataset of ``config``; pipelines built once each."""

    def __init__(self, config: Config) -> None:
        import sys

        import torch

        torch.set_num_threads(1)
        for folder in config.server.python_path:
            if folder not in sys.path:
                sys.path.insert(0, folder)
        self._config = config
        self._pipelines: dict[str, Any] = {}

    def ready(self) -> bool:
        return True

    def build(
        self, dataset: str, batches: Sequence[Sequence[int]], seed: int, epoch: int
    ) -> tuple[list[bytes], list[np.ndarray], str | None, float]:
        from batchwire import wire
        from batchwire.server.batches import build_each
        from batchwire.server.config import ConfigError
        from batchwire.server.pipeline import build_pipeline

        started = time.perf_counter()
        headers: list[bytes] = []
        payloads: list[np.ndarray] = []

        def put(header: pb.BatchHeader, tensors: list[Any]) -> None:
            payload = np.zeros(header.payload_size, np.uint8)  # alignment gaps too: same bytes
            wire.write_payload(tensors, list(header.tensors), memoryview(payload))
            headers.append(header.SerializeToString())
            payloads.append(payload)

        try:
            if dataset not in self._pipelines:
                self._pipelines[dataset] = build_pipeline(
                    self._config.datasets[dataset], self._config.file, for_sampling=False
                )
            error = build_each(
                self._pipelines[dataset], dataset, batches, put, seed=seed, epoch=epoch
            )
        except ConfigError as exc:
            error = str(exc)
        return headers, payloads, error, time.perf_counter() - started


@dataclass
class _Job:
    task: BatchTask
    future: Future[list[BuiltBatch]]
    attempts: int = 0


class RayExecutor:
    """``Executor`` over ``workers`` Ray actors (see the module docstring)."""

    def __init__(self, config: Config, workers: int) -> None:
        self._config = config
        self._workers = workers
        self._timeout = config.server.task_timeout_seconds
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[_Job] = deque()
        self._closed = False
        self._alive = 0
        self._started_ray = False
        self._threads: list[threading.Thread] = []
        self._temp_dir = f"/tmp/bwray-{os.getpid()}"  # short: AF_UNIX paths <= 107 bytes
        self._failure: str | None = None
        self._listeners: list[HealthListener] = []
        self.replaced = 0
        self.place_seconds = PLACE_SECONDS

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        import ray

        settings = self._config.server
        if not ray.is_initialized():
            if settings.ray_address:
                ray.init(address=settings.ray_address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=settings.ray_num_cpus or None,
                    object_store_memory=OBJECT_STORE_BYTES,
                    include_dashboard=False,
                    log_to_driver=False,
                    _temp_dir=self._temp_dir,
                )
                self._started_ray = True
        self._actor_class = ray.remote(num_cpus=settings.ray_actor_cpus)(Builder)
        for slot in range(self._workers):
            thread = threading.Thread(
                target=self._run_slot, args=(slot,), name=f"batchwire-ray-{slot}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def warm_up(self, datasets: Iterable[str]) -> None:
        names = list(datasets)
        futures = [self.submit(BatchTask(name, [[0]])) for name in names for _ in self._threads]
        for future in futures:
            exc = future.exception()
            if exc is not None:
                log.warning("warm-up failed: %s", exc)

    def close(self) -> None:
        with self._changed:
            if self._closed:
                return
            self._closed = True
            jobs, self._queue = list(self._queue), deque()
            self._changed.notify_all()
        for job in jobs:
            settle(job.future, exception=ExecutorClosed("the server is shutting down"))
        for thread in self._threads:
            thread.join(timeout=self._timeout + 5)
        if self._started_ray:
            import ray

            ray.shutdown()
            shutil.rmtree(self._temp_dir, ignore_errors=True)  # its session's sockets and logs

    # -- tasks ---------------------------------------------------------------------------

    def submit(self, task: BatchTask) -> Future[list[BuiltBatch]]:
        job = _Job(task, Future())
        with self._changed:
            if self._closed:
                job.future.set_exception(ExecutorClosed("the server is shutting down"))
            elif self._failure is not None:
                job.future.set_exception(ExecutorFailed(self._failure))
            else:
                self._queue.append(job)
                self._changed.notify()
        return job.future

    def group_size(self, batch_bytes: int, build_seconds: float | None) -> int:
        return group_size(batch_bytes, build_seconds)

    @property
    def failure(self) -> str | None:
        """Why no batch can be built now (no actor alive or placeable); None while one can."""
        with self._lock:
            return self._failure

    def on_health_change(self, listener: HealthListener) -> None:
        """Calls ``listener(failure)`` now and on each change (from a slot thread)."""
        with self._lock:
            self._listeners.append(listener)
            failure = self._failure
        listener(failure)

    def _set_failure(self, failure: str | None) -> None:
        with self._changed:
            if (failure is None) == (self._failure is None):
                return
            self._failure = failure
            doomed: list[_Job] = []
            if failure is not None:
                doomed, self._queue = list(self._queue), deque()
            listeners = list(self._listeners)
        for job in doomed:
            settle(job.future, exception=ExecutorFailed(failure or ""))
        if failure is None:
            log.warning("ray executor: an actor is alive again: serving again")
        else:
            log.error("ray executor has failed: %s", failure)
        for listener in listeners:
            try:
                listener(failure)
            except Exception:
                log.exception("a health listener failed")

    def _actor_up(self) -> None:
        with self._lock:
            self._alive += 1
        self._set_failure(None)

    @property
    def size(self) -> int:
        with self._lock:
            return self._alive

    # -- one slot's thread ------------------------------------------------------------------

    def _next_job(self) -> _Job | None:
        with self._changed:
            while True:
                if self._closed:
                    return None
                while self._queue:
                    job = self._queue.popleft()
                    if not job.future.cancelled():
                        return job
                self._changed.wait()

    def _new_actor(self) -> Any | None:
        """A started actor; None once closed. Waits while the cluster cannot place it."""
        import ray

        actor = self._actor_class.remote(self._config)
        since = time.monotonic()
        while True:
            try:
                ray.get(actor.ready.remote(), timeout=1.0)
                return actor
            except ray.exceptions.GetTimeoutError:
                if self._closed:
                    ray.kill(actor)
                    return None
            except ray.exceptions.RayActorError:
                actor = self._actor_class.remote(self._config)
            waited = time.monotonic() - since
            with self._lock:
                stranded = self._alive == 0 and waited > self.place_seconds
            if stranded:
                cpus = self._config.server.ray_actor_cpus
                self._set_failure(
                    f"no Ray actor is alive, and the cluster has placed none for {waited:.0f}s "
                    f"(each of the {self._workers} needs ray_actor_cpus={cpus:g} CPU): batches "
                    "cannot be built until it has the CPUs"
                )

    def _run_slot(self, slot: int) -> None:
        import ray

        actor = self._new_actor()
        if actor is None:
            return
        self._actor_up()
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                task = job.task
                ref = actor.build.remote(task.dataset, task.batches, task.seed, task.epoch)
                try:
                    reply = ray.get(ref, timeout=self._timeout)
                except ray.exceptions.GetTimeoutError:
                    ray.kill(actor)
                    settle(job.future, exception=TaskTimedOut(self._timed_out(task)))
                    actor = self._replace(slot, "killed after task_timeout_seconds")
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                    self._requeue(job, exc)
                    actor = self._replace(slot, f"lost: {type(exc).__name__}")
                except Exception as exc:  # the task's own error, wrapped by Ray
                    settle(job.future, exception=BatchFailed(f"dataset {task.dataset!r}: {exc}"))
                else:
                    self._deliver(job, *reply)
                if actor is None:
                    return
        finally:
            with self._lock:
                self._alive -= 1
            if actor is not None:
                ray.kill(actor)  # its CPUs go back to the cluster now, not when collected

    def _replace(self, slot: int, why: str) -> Any | None:
        with self._lock:
            self._alive -= 1
            self.replaced += 1
        log.warning("ray actor of slot %d %s; starting a new one", slot, why)
        actor = self._new_actor()
        if actor is not None:
            self._actor_up()
        return actor

    def _requeue(self, job: _Job, exc: BaseException) -> None:
        job.attempts += 1
        if job.attempts >= MAX_ATTEMPTS:
            first = [int(index) for index in job.task.batches[0][:8]]
            settle(
                job.future,
                exception=WorkerCrashed(
                    f"dataset {job.task.dataset!r}: ray actors were lost {job.attempts} times "
                    f"while building the batch of sample indices {first}... (last: {exc})"
                ),
            )
            return
        with self._changed:
            failure = self._failure
            if failure is None:
                self._queue.appendleft(job)  # first in line: its stream waits on it
                self._changed.notify()
        if failure is not None:
            settle(job.future, exception=ExecutorFailed(failure))

    def _timed_out(self, task: BatchTask) -> str:
        indices = list(task.batches[0])
        return (
            f"dataset {task.dataset!r}: the batch starting at sample index {int(indices[0])} "
            f"({len(indices)} samples, {len(task.batches)} batch(es) in the task) took longer "
            f"than task_timeout_seconds={self._timeout:g}; its ray actor was killed"
        )

    @staticmethod
    def _deliver(
        job: _Job,
        headers: list[bytes],
        payloads: list[np.ndarray],
        error: str | None,
        busy: float,
    ) -> None:
        built = [
            BuiltBatch(
                pb.BatchHeader.FromString(header),
                memoryview(payload).cast("B"),
                busy / max(len(headers), 1),
            )
            for header, payload in zip(headers, payloads, strict=True)
        ]
        if error is not None:
            settle(job.future, exception=BatchFailed(error, built))
        else:
            settle(job.future, built)
