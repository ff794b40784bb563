"""An executor that builds batches in threads of this process: small, and an engine all the same.

No processes, no shared memory: each thread builds its own copy of a
dataset's pipeline (as a worker process would) and each batch's payload is a
``bytearray`` of its own. For tests of the stream and for stepping through a
dataset's code in a debugger; the GIL makes it slow for real serving.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from batchwire import wire
from batchwire.server._tasks import (
    BatchFailed,
    BatchTask,
    BuiltBatch,
    ExecutorClosed,
    settle,
)
from batchwire.server.batches import build_each
from batchwire.server.config import Config, ConfigError
from batchwire.server.executor import HealthListener
from batchwire.server.pipeline import build_pipeline
from batchwire.v1 import batchwire_pb2 as pb

GROUP_BYTES = 1 << 20
"""Small batches share a task up to about this many bytes (a task costs a thread hand-off)."""


class ThreadExecutor:
    """``Executor`` building in ``threads`` threads of the calling process."""

    def __init__(self, config: Config, threads: int = 2) -> None:
        self._config = config
        self._threads = threads
        for folder in config.server.python_path:  # for `python` sources, as a worker does
            if folder not in sys.path:
                sys.path.insert(0, folder)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="batchwire-build")
        self._local = threading.local()  # each thread's pipelines, by dataset name
        self._lock = threading.Lock()
        self._pending: set[Future[list[BuiltBatch]]] = set()
        self._closed = False

    def start(self) -> None:
        pass  # threads start with the first task

    def warm_up(self, datasets: Iterable[str]) -> None:
        for name in datasets:
            self.submit(BatchTask(name, [[0]])).exception()

    def submit(self, task: BatchTask) -> Future[list[BuiltBatch]]:
        future: Future[list[BuiltBatch]] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(ExecutorClosed("the server is shutting down"))
                return future
            self._pending.add(future)
        future.add_done_callback(self._forget)
        self._pool.submit(self._run, task, future)
        return future

    def _forget(self, future: Future[list[BuiltBatch]]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _run(self, task: BatchTask, future: Future[list[BuiltBatch]]) -> None:
        if future.cancelled():
            return  # its stream ended before a thread took it
        started = time.perf_counter()
        built: list[BuiltBatch] = []

        def put(header: pb.BatchHeader, tensors: list[torch.Tensor]) -> None:
            payload = bytearray(header.payload_size)
            wire.write_payload(tensors, list(header.tensors), memoryview(payload))
            built.append(BuiltBatch(header, memoryview(payload), 0.0))

        try:
            pipeline = self._pipeline(task.dataset)
            error = build_each(
                pipeline, task.dataset, task.batches, put, seed=task.seed, epoch=task.epoch
            )
        except ConfigError as exc:
            error = str(exc)
        for batch in built:
            batch.build_seconds = (time.perf_counter() - started) / len(built)
        if error is not None:
            settle(future, exception=BatchFailed(error, built))
        else:
            settle(future, built)

    def _pipeline(self, name: str) -> Any:
        pipelines = self._local.__dict__.setdefault("pipelines", {})
        if name not in pipelines:
            pipelines[name] = build_pipeline(
                self._config.datasets[name], self._config.file, for_sampling=False
            )
        return pipelines[name]

    def group_size(self, batch_bytes: int, build_seconds: float | None) -> int:
        if batch_bytes <= 0:
            return 1
        return max(1, min(16, GROUP_BYTES // batch_bytes))

    @property
    def failure(self) -> str | None:
        return None  # threads of this process cannot be lost without the process

    def on_health_change(self, listener: HealthListener) -> None:
        listener(None)

    @property
    def size(self) -> int:
        return self._threads

    @property
    def replaced(self) -> int:
        return 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for future in pending:
            settle(future, exception=ExecutorClosed("the server is shutting down"))
