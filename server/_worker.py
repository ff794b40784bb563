"""The worker process: receives batch tasks over a pipe, builds them, reports back.

A worker is created once, at server start-up (or to replace one that died),
builds each dataset's pipeline (source, transforms, collate) from the config
the first time a task names it, and keeps it. A task carries the stream's seed
and epoch: random transforms draw from an RNG seeded by (seed, epoch, index),
so a batch is the same whichever worker builds it. It never talks gRPC. Protocol, all over one duplex pipe:

    pool -> worker: (task_id, dataset, batches, path, seed, epoch) | None (stop)
    worker -> pool: (task_id, headers, offsets, size, error, busy_seconds)

A task is one batch, or a few small consecutive ones of a stream (``batches`` is
a list of index lists), built in order into one payload file at ``path``:
``headers[k]`` (serialised ``BatchHeader``) at ``offsets[k]``. ``error`` (or
None) says why the batch after the last header failed.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection

import torch

from batchwire.server._fastpath import (
    IDLE_SECONDS,
    KeptFiles,
    release_freed_memory,
    reuse_freed_memory,
)
from batchwire.server.batches import ITEM_ERRORS, WrittenBatches, build_and_write
from batchwire.server.config import Config, ConfigError
from batchwire.server.pipeline import Pipeline, build_pipeline


def run(config: Config, conn: Connection) -> None:
    """Worker main loop; returns when the pool says stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    torch.set_num_threads(1)  # one process per core already; threads would oversubscribe
    reuse_freed_memory()  # batch-sized blocks are reused, not faulted in anew (see _fastpath)
    for folder in config.server.python_path:
        if folder not in sys.path:
            sys.path.insert(0, folder)
    datasets: dict[str, Pipeline] = {}
    kept = KeptFiles()  # payload files mapped between tasks (see _fastpath)
    while True:
        try:
            if not conn.poll(IDLE_SECONDS):
                kept.release()
                release_freed_memory()  # idle: give kept batch memory back (see _fastpath)
            task = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if task is None:
            return
        task_id, name, batches, path, seed, epoch = task
        started = time.perf_counter()
        try:
            if name not in datasets:
                datasets[name] = build_pipeline(
                    config.datasets[name], config.file, for_sampling=False
                )
            kept.sweep()  # let go of the files the pool removed since the last task
            written = build_and_write(
                datasets[name], name, batches, path, seed=seed, epoch=epoch, kept=kept
            )
        except ConfigError as exc:
            written = WrittenBatches(error=str(exc))
        except (
            ITEM_ERRORS
        ) as exc:  # the payload file (ENOSPC), a factory's sys.exit: the task fails
            where = traceback.format_exception_only(exc)[-1].strip()
            written = WrittenBatches(error=f"dataset {name!r}: worker failed: {where}")
        reply = (
            task_id,
            written.headers,
            written.offsets,
            written.size,
            written.error,
            time.perf_counter() - started,
        )
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
