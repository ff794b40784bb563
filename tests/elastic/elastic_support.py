"""Elastic jobs for the tests: ranks stepping in lock-step through schedules of shapes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from batchwire.client import RemoteDataset, RetryPolicy

TESTS_CONFIG = """
[server]
python_path = ["{tests}"]
max_batch_size = 1024

[datasets.dict]
source = "python"
factory = "sample_datasets:indexed_dict"
kwargs = {{ length = {length} }}
"""

# Reconnects quickly while a killed server restarts (a restart takes seconds).
QUICK_RETRY = RetryPolicy(attempts=400, deadline=120.0, initial_backoff=0.05, max_backoff=0.5)


@dataclass(frozen=True)
class Segment:
    """``steps`` global steps of ``world_size`` ranks at ``batch_size`` (None: to the epoch's end)."""

    world_size: int
    batch_size: int
    steps: int | None


class ElasticJob:
    """One job's ranks (``RemoteDataset`` with the elastic sampler), stepped together.

    A new world size is a new job: the ranks are made again and each loads
    rank 0's checkpoint. A new batch size alone is ``set_batch_size`` on the
    running passes.
    """

    def __init__(self, target: str, *, seed: int, drop_last: bool, streams: int = 1) -> None:
        self.target, self.seed, self.drop_last, self.streams = target, seed, drop_last, streams
        self.ranks: list[RemoteDataset] = []
        self.passes: list[Iterator[Any]] = []

    def start(self, world_size: int, batch_size: int, state: dict | None, epoch: int) -> bool:
        """Starts the ranks at ``state`` (None: ``epoch``'s start); False if that epoch is over."""
        self.close()
        self.ranks = [
            RemoteDataset(
                self.target,
                "dict",
                batch_size=batch_size,
                shuffle=True,
                seed=self.seed,
                drop_last=self.drop_last,
                rank=rank,
                world_size=world_size,
                sampler="elastic",
                streams=self.streams,
                retry=QUICK_RETRY,
            )
            for rank in range(world_size)
        ]
        for ds in self.ranks:
            if state is None:
                ds.set_epoch(epoch)
            else:
                ds.load_state_dict(state)
        if self.ranks[0].epoch != epoch:  # saved at the epoch's end: the next one is due
            return False
        self.passes = [iter(ds) for ds in self.ranks]
        return True

    def step(self) -> list[list[int]] | None:
        """Each rank's next batch (indices; [] for a rank without one), or None at the epoch's end."""
        batches = [next(p, None) for p in self.passes]
        if all(b is None for b in batches):
            return None
        return [[] if b is None else b["index"].tolist() for b in batches]

    def state(self) -> dict:
        return self.ranks[0].state_dict()

    def close(self) -> None:
        for p in self.passes:
            p.close()  # type: ignore[attr-defined]
        self.passes = []


def run_schedule(
    target: str,
    segments: list[Segment],
    *,
    seed: int,
    epoch: int,
    drop_last: bool,
    streams: int = 1,
    at_step: Any = None,
) -> tuple[list[list[list[int]]], Segment]:
    """Runs ``segments`` (the last to the epoch's end); returns the steps and the last shape.

    ``at_step(n)`` is called before global step n (e.g. to kill the server).
    """
    job = ElasticJob(target, seed=seed, drop_last=drop_last, streams=streams)
    steps: list[list[list[int]]] = []
    shape = segments[0]
    try:
        for number, segment in enumerate(segments):
            if number == 0:
                job.start(segment.world_size, segment.batch_size, None, epoch)
            elif segment.world_size != shape.world_size:
                if not job.start(segment.world_size, segment.batch_size, job.state(), epoch):
                    return steps, shape
            else:
                for ds in job.ranks:
                    ds.set_batch_size(segment.batch_size)
            shape = segment
            done = 0
            while segment.steps is None or done < segment.steps:
                if at_step is not None:
                    at_step(len(steps))
                step = job.step()
                if step is None:
                    return steps, shape
                steps.append(step)
                done += 1
        raise AssertionError("the last segment runs to the epoch's end")
    finally:
        job.close()


def restart_in_background(server: Any) -> threading.Thread:
    """SIGKILL now; start again on the same port from another thread (takes seconds)."""
    server.kill()
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    return thread
