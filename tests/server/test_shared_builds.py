"""SharedBuilds (server/shared_builds.py): streams through one executor, built in threads.

Several ``BatchStream`` s run on one event loop through one ``SharedBuilds``
over a real in-process executor (``ThreadExecutor``); the ``counted`` dataset
appends each sample it loads to a file, so the tests count builds, never
seconds. The real server is checked in test_shared_builds_server.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_stream import LENGTH, _Client, _config, _expected

from batchwire.server._tasks import BatchFailed, BatchTask, BuiltBatch
from batchwire.server.inprocess import ThreadExecutor
from batchwire.server.samplers import BatchPlan
from batchwire.server.shared_builds import SharedBuilds
from batchwire.server.stream import BatchStream, StreamHooks, StreamLimits, StreamStopped

BATCH = 8
BATCHES = LENGTH // BATCH  # 25


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[ThreadExecutor]:
    built = ThreadExecutor(_config(tmp_path), threads=2)
    yield built
    built.close()


class _Run:
    """One stream through ``shared``: its client, the batches it was handed, its handle."""

    def __init__(
        self,
        shared: SharedBuilds,
        dataset: str,
        *,
        seed: int = 3,
        positions: range = range(BATCHES),
        batch_bytes: int = 0,
    ) -> None:
        self.client = _Client()
        self.built: list[BuiltBatch] = []
        plan = _plan(seed)
        self.handle = shared.stream(plan, positions)
        self.stream = BatchStream(
            self.handle,
            dataset,
            plan,
            positions,
            StreamLimits(prefetch_batches=4, chunk_bytes=1 << 20, max_batch_bytes=1 << 30),
            StreamHooks(write=self.client.write, on_built=self.built.append),
            batch_bytes=batch_bytes,
        )

    async def run(self) -> None:
        try:
            await self.stream.run()
        finally:
            self.handle.close()


@functools.cache
def _plan(seed: int) -> BatchPlan:
    """One plan object per seed, as the server's plan cache hands identical requests."""
    return BatchPlan.fixed(torch.arange(LENGTH).numpy(), BATCH, False, seed=seed, epoch=1)


def _loads(tmp_path: Path) -> int:
    counter = tmp_path / "built.txt"
    return len(counter.read_text().split()) if counter.exists() else 0


def _all_released(runs: list[_Run]) -> bool:
    return all(len(batch.payload) == 0 for run in runs for batch in run.built)


async def _gather(*runs: _Run) -> None:
    await asyncio.gather(*(run.run() for run in runs))


@pytest.mark.parametrize("batch_bytes", [0, 8 * 4096 * 8])
def test_identical_streams_build_each_batch_about_once(
    executor: ThreadExecutor, tmp_path: Path, batch_bytes: int
) -> None:
    hits: list[str] = []
    shared = SharedBuilds(executor, on_shared=hits.append)
    runs = [_Run(shared, "counted", batch_bytes=batch_bytes) for _ in range(8)]
    asyncio.run(_gather(*runs))
    for run in runs:
        received = run.client.batches()
        assert [position for position, _ in received] == list(range(BATCHES))
        for position, batch in received:
            assert torch.equal(batch, _expected(position, BATCH, 4096))
    # Without sharing: 8 x 200 loads. Streams on one loop start together: each batch once,
    # give or take a few built twice where one stream's window ran ahead of the others.
    assert _loads(tmp_path) <= 2 * LENGTH
    assert len(hits) == 8 * BATCHES - _loads(tmp_path) // BATCH
    assert set(hits) == {"counted"}
    assert _all_released(runs)
    assert shared.held == (0, 0)


def test_different_seeds_never_share(executor: ThreadExecutor, tmp_path: Path) -> None:
    # Same order (shuffle off), different seeds: random transforms would differ.
    hits: list[str] = []
    shared = SharedBuilds(executor, on_shared=hits.append)
    runs = [_Run(shared, "counted", seed=seed) for seed in (1, 2)]
    asyncio.run(_gather(*runs))
    assert hits == []
    assert _loads(tmp_path) == 2 * LENGTH
    assert shared.held == (0, 0)


def test_overlapping_positions_share_what_overlaps(
    executor: ThreadExecutor, tmp_path: Path
) -> None:
    hits: list[str] = []
    shared = SharedBuilds(executor, on_shared=hits.append)
    whole, strided = _Run(shared, "counted"), _Run(shared, "counted", positions=range(0, 20, 2))
    asyncio.run(_gather(whole, strided))
    assert [p for p, _ in strided.client.batches()] == list(range(0, 20, 2))
    for position, batch in strided.client.batches():
        assert torch.equal(batch, _expected(position, BATCH, 4096))
    assert [p for p, _ in whole.client.batches()] == list(range(BATCHES))
    assert _loads(tmp_path) < LENGTH + 10 * BATCH  # not every strided batch built again
    assert hits
    assert shared.held == (0, 0)


def test_a_failed_batch_fails_every_stream_that_shares_it(executor: ThreadExecutor) -> None:
    shared = SharedBuilds(executor)
    runs = [_Run(shared, "broken", batch_bytes=64) for _ in range(3)]

    async def scenario() -> list[BaseException]:
        return await asyncio.gather(*(run.run() for run in runs), return_exceptions=True)

    for run, outcome in zip(runs, asyncio.run(scenario()), strict=True):
        assert isinstance(outcome, StreamStopped)
        assert isinstance(outcome.failure, BatchFailed)
        assert "sample index 53" in str(outcome.failure)
        assert outcome.position == 53 // BATCH
        assert [p for p, _ in run.client.batches()] == list(range(53 // BATCH))
    assert _all_released(runs)
    assert shared.held == (0, 0)


def test_a_stalled_stream_does_not_hold_up_the_others(
    executor: ThreadExecutor, tmp_path: Path
) -> None:
    # One client stops reading after its first batch; the others read everything.
    shared = SharedBuilds(executor, held_bytes=4 * BATCH * 4096 * 8)
    slow, *fast = [_Run(shared, "counted") for _ in range(3)]

    async def scenario() -> None:
        stalled = asyncio.create_task(slow.run())
        slow.client.block.clear()
        await asyncio.wait_for(_gather(*fast), timeout=120)
        # Finished while the stalled one holds its first message and a prefetch at most.
        assert len(slow.client.messages) <= 1
        assert len(slow.built) <= 1 + 4
        # Held for it: at most the budget (4 batches) beyond what it already asked for.
        assert shared.held[1] <= 4
        stalled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stalled

    asyncio.run(scenario())
    for run in fast:
        assert [p for p, _ in run.client.batches()] == list(range(BATCHES))
    assert _all_released([slow, *fast])
    assert shared.held == (0, 0)


def test_a_late_stream_reuses_what_is_still_held(executor: ThreadExecutor, tmp_path: Path) -> None:
    # The second stream starts once the first has sent a few batches: what the first
    # built since is held for it (the budget allows all 25) and not built again.
    hits: list[str] = []
    shared = SharedBuilds(executor, on_shared=hits.append)
    first, second = _Run(shared, "counted"), _Run(shared, "counted")

    async def scenario() -> None:
        task = asyncio.create_task(first.run())
        while len(first.client.messages) < 3:
            await asyncio.sleep(0.001)
        first.client.block.clear()  # the first waits here until the second has started
        late = asyncio.create_task(second.run())
        await asyncio.sleep(0)
        first.client.block.set()
        await asyncio.gather(task, late)

    asyncio.run(scenario())
    assert [p for p, _ in second.client.batches()] == list(range(BATCHES))
    assert _loads(tmp_path) < 2 * LENGTH - 10 * BATCH
    assert len(hits) >= 10
    assert shared.held == (0, 0)


def test_a_stream_left_alone_takes_what_is_held_for_it(
    executor: ThreadExecutor, tmp_path: Path
) -> None:
    # Its client reads nothing until the other stream has ended: what that one built
    # past its prefetch is held for it, and still taken once it is the plan's only
    # stream (it used to go straight to the executor then, building it all again).
    hits: list[str] = []
    shared = SharedBuilds(executor, on_shared=hits.append)
    behind, ahead = _Run(shared, "counted"), _Run(shared, "counted")

    async def scenario() -> int:
        behind.client.block.clear()
        late = asyncio.create_task(behind.run())
        await asyncio.wait_for(ahead.run(), timeout=120)
        built = _loads(tmp_path)
        assert shared.held[1] >= BATCHES - 1 - 4  # all but its first message and prefetch
        behind.client.block.set()
        await asyncio.wait_for(late, timeout=120)
        return built

    built = asyncio.run(scenario())
    assert [p for p, _ in behind.client.batches()] == list(range(BATCHES))
    assert _loads(tmp_path) == built  # nothing built again once alone
    assert built <= LENGTH + 5 * BATCH
    assert len(hits) >= BATCHES - 5
    assert _all_released([behind, ahead])
    assert shared.held == (0, 0)


def test_streams_that_never_want_a_batch_hold_none(executor: ThreadExecutor) -> None:
    # A trainer's parallel streams (disjoint positions of one plan), and another seed:
    # nobody else will ask for what each builds, so nothing is held for later.
    shared = SharedBuilds(executor)
    runs = [
        _Run(shared, "counted", positions=range(0, BATCHES, 2)),
        _Run(shared, "counted", positions=range(1, BATCHES, 2)),
        _Run(shared, "counted", seed=4),
    ]
    most = 0

    async def scenario() -> None:
        nonlocal most
        task = asyncio.ensure_future(_gather(*runs))
        while not task.done():
            most = max(most, shared.held[1])
            await asyncio.sleep(0.001)
        await task

    asyncio.run(scenario())
    assert most == 0
    assert [p for p, _ in runs[1].client.batches()] == list(range(1, BATCHES, 2))
    assert shared.held == (0, 0)


def test_every_field_of_a_task_is_in_the_key() -> None:
    # SharedBuilds keys a batch by its indices and every other BatchTask field, and
    # splits and regroups tasks: a new field must be per task (hashable), not per batch.
    # When this fails, check NOTE [ Shared builds ] before adding the field here.
    fields = {field.name for field in dataclasses.fields(BatchTask)}
    assert fields == {"dataset", "batches", "seed", "epoch"}
