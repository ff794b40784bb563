"""BatchStream (server/stream.py) driven by a real in-process executor (ThreadExecutor).

The executor builds batches from a ``python`` dataset in threads of this
process; the stream's messages are decoded with the client's own assembler.
Order, grouping, packing, failures (typed, at the right position), drain,
cancellation and the release of every built batch are checked here; the
integration tests check the same stream through the real server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from batchwire import wire
from batchwire.server._tasks import (
    BatchFailed,
    BuiltBatch,
    ExecutorClosed,
    ExecutorFailed,
    TaskTimedOut,
    WorkerCrashed,
)
from batchwire.server.config import Config, load_config
from batchwire.server.inprocess import ThreadExecutor
from batchwire.server.samplers import BatchPlan
from batchwire.server.service import failure_status
from batchwire.server.stream import (
    BatchStream,
    BatchTooLarge,
    Draining,
    StreamHooks,
    StreamLimits,
    StreamStopped,
)

HERE = Path(__file__).resolve().parent
LENGTH = 200


def _config(tmp_path: Path) -> Config:
    path = tmp_path / "stream.toml"
    path.write_text(
        f"""
[server]
python_path = ["{HERE}"]

[datasets.small]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = {LENGTH} }}

[datasets.big]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = {LENGTH}, size = 4096 }}

[datasets.broken]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = {LENGTH}, fail = 53 }}

[datasets.counted]
source = "python"
factory = "stream_data:numbered"
kwargs = {{ length = {LENGTH}, size = 4096, counter = "{tmp_path / "built.txt"}" }}
"""
    )
    return load_config(path)


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[ThreadExecutor]:
    built = ThreadExecutor(_config(tmp_path), threads=2)
    yield built
    built.close()


def _plan(batch_size: int) -> BatchPlan:
    return BatchPlan.fixed(torch.arange(LENGTH).numpy(), batch_size, False, seed=3, epoch=1)


class _Client:
    """Collects the stream's messages; decodes them as a client would."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.block = asyncio.Event()
        self.block.set()

    async def write(self, message: bytes) -> None:
        await self.block.wait()
        self.messages.append(bytes(message))

    def batches(self) -> list[tuple[int, torch.Tensor]]:
        assembler = wire.BatchAssembler()
        out = []
        for message in self.messages:
            for header, batch in assembler.feed(wire.parse_chunk(message)):
                out.append((header.batch_index, batch))
        return out


def _stream(
    executor: ThreadExecutor,
    dataset: str,
    client: _Client,
    *,
    batch_size: int = 8,
    positions: range | None = None,
    per_message: int = 1,
    max_batch_bytes: int = 1 << 30,
    built: list[BuiltBatch] | None = None,
    draining=lambda: False,
    batch_bytes: int = 0,
) -> BatchStream:
    plan = _plan(batch_size)
    kept = built if built is not None else []
    return BatchStream(
        executor,
        dataset,
        plan,
        positions if positions is not None else range(len(plan)),
        StreamLimits(
            prefetch_batches=4,
            chunk_bytes=1 << 20,
            max_batch_bytes=max_batch_bytes,
            per_message=per_message,
        ),
        StreamHooks(write=client.write, draining=draining, on_built=kept.append),
        batch_bytes=batch_bytes,
    )


def _expected(position: int, batch_size: int, size: int = 1) -> torch.Tensor:
    indices = torch.arange(position * batch_size, min(LENGTH, (position + 1) * batch_size))
    return indices[:, None].expand(-1, size)


@pytest.mark.parametrize("per_message", [1, 8])
@pytest.mark.parametrize("batch_bytes", [0, 64])
def test_every_batch_in_order(executor: ThreadExecutor, per_message: int, batch_bytes: int) -> None:
    # batch_bytes=64 lets the executor group 16 batches per task; per_message=8 packs them.
    client = _Client()
    built: list[BuiltBatch] = []
    stream = _stream(
        executor, "small", client, per_message=per_message, built=built, batch_bytes=batch_bytes
    )
    asyncio.run(stream.run())
    received = client.batches()
    assert [position for position, _ in received] == list(range(25))
    for position, batch in received:
        assert torch.equal(batch, _expected(position, 8))
    if per_message > 1 and batch_bytes:
        assert len(client.messages) < 25  # grouped small batches did share messages
    assert len(built) == 25
    assert all(len(batch.payload) == 0 for batch in built)  # every one released once sent


def test_batches_built_while_a_write_waits_share_the_next_message(
    executor: ThreadExecutor,
) -> None:
    # One batch per task (batch_bytes=0); the client takes its first message late, so the
    # tasks ahead are built by then: each message cost grpc.aio ~0.4 ms when it went alone.
    client = _Client()
    client.block.clear()
    built: list[BuiltBatch] = []
    stream = _stream(executor, "small", client, per_message=8, built=built)

    async def main() -> None:
        running = asyncio.ensure_future(stream.run())
        for _ in range(6000):  # until the tasks ahead are built (60 s bound a hang)
            await asyncio.sleep(0.01)
            if len(stream._pending) > 1 and all(f.done() for _, f in stream._pending):
                break
        client.block.set()
        await running

    asyncio.run(main())
    received = client.batches()
    assert [position for position, _ in received] == list(range(25))
    for position, batch in received:
        assert torch.equal(batch, _expected(position, 8))
    assert len(client.messages) < 25
    assert len(built) == 25
    assert all(len(batch.payload) == 0 for batch in built)  # every one released once sent


def test_a_slow_client_holds_no_more_than_the_prefetch_and_one_message(
    executor: ThreadExecutor,
) -> None:
    # The executor is always ahead of this client, so the stream keeps packing built tasks
    # into the next message: each batch must still go back once its message is out.
    built: list[BuiltBatch] = []
    held: list[int] = []

    class SlowClient(_Client):
        async def write(self, message: bytes) -> None:
            await asyncio.sleep(0.02)
            held.append(sum(1 for batch in built if len(batch.payload)))
            await super().write(message)

    client = SlowClient()
    stream = _stream(executor, "small", client, per_message=4, built=built)
    asyncio.run(stream.run())
    assert [position for position, _ in client.batches()] == list(range(25))
    assert len(client.messages) < 25  # packed: built tasks joined the next message
    assert max(held) <= 4 + 4  # prefetch_batches, and the message being written
    assert all(len(batch.payload) == 0 for batch in built)


def test_batches_packed_before_a_drain_still_go_out(executor: ThreadExecutor) -> None:
    # Each check sleeps, so that the next task is built when the stream decides whether to
    # flush: batches wait packed while the stream turns to the next task, and the drain
    # comes due there (the 5th check: the wait on task 2).
    client = _Client()
    checks = []

    def draining() -> bool:
        time.sleep(0.05)
        checks.append(None)
        return len(checks) >= 5

    stream = _stream(executor, "small", client, per_message=8, draining=draining)
    with pytest.raises(StreamStopped) as stopped:
        asyncio.run(stream.run())
    assert isinstance(stopped.value.failure, Draining)
    assert stopped.value.position >= 1  # 2, unless a slow task made the wait check again
    delivered = [position for position, _ in client.batches()]
    assert delivered == list(range(stopped.value.position))  # every batch before it went out


def test_a_range_of_positions(executor: ThreadExecutor) -> None:
    client = _Client()
    asyncio.run(_stream(executor, "big", client, positions=range(3, 20, 4)).run())
    received = client.batches()
    assert [position for position, _ in received] == [3, 7, 11, 15, 19]
    for position, batch in received:
        assert torch.equal(batch, _expected(position, 8, 4096))


def test_a_failed_batch_stops_the_stream_after_the_ones_before_it(
    executor: ThreadExecutor,
) -> None:
    client = _Client()
    built: list[BuiltBatch] = []
    stream = _stream(executor, "broken", client, batch_bytes=64, built=built, per_message=4)
    with pytest.raises(StreamStopped) as stopped:
        asyncio.run(stream.run())
    assert isinstance(stopped.value.failure, BatchFailed)
    assert "dataset 'broken', sample index 53" in str(stopped.value.failure)
    assert stopped.value.position == 53 // 8
    assert [position for position, _ in client.batches()] == list(range(53 // 8))
    assert all(len(batch.payload) == 0 for batch in built)
    code, message = failure_status(stopped.value.failure, stopped.value.position)
    assert code == grpc.StatusCode.INTERNAL and "sample index 53" in message


def test_a_batch_over_max_batch_bytes(executor: ThreadExecutor) -> None:
    client = _Client()
    stream = _stream(executor, "big", client, max_batch_bytes=8 * 4096 * 8 - 1)
    with pytest.raises(StreamStopped) as stopped:
        asyncio.run(stream.run())
    assert isinstance(stopped.value.failure, BatchTooLarge)
    assert "max_batch_bytes" in str(stopped.value.failure)
    assert client.batches() == []
    code, _ = failure_status(stopped.value.failure, stopped.value.position)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_draining_ends_the_stream_where_a_client_resumes(executor: ThreadExecutor) -> None:
    client = _Client()
    drain_after = 5

    def draining() -> bool:
        return len(client.messages) >= drain_after

    stream = _stream(executor, "big", client, draining=draining)
    with pytest.raises(StreamStopped) as stopped:
        asyncio.run(stream.run())
    assert isinstance(stopped.value.failure, Draining)
    assert stopped.value.position == drain_after
    assert [position for position, _ in client.batches()] == list(range(drain_after))
    code, message = failure_status(stopped.value.failure, stopped.value.position)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert f"resume at batch {drain_after} on another server" in message


def test_a_closed_executor_ends_the_stream_unavailable(executor: ThreadExecutor) -> None:
    executor.close()
    client = _Client()
    with pytest.raises(StreamStopped) as stopped:
        asyncio.run(_stream(executor, "small", client, positions=range(4, 10)).run())
    assert isinstance(stopped.value.failure, ExecutorClosed)
    code, message = failure_status(stopped.value.failure, stopped.value.position)
    assert code == grpc.StatusCode.UNAVAILABLE and "resume at batch 4" in message


def test_a_cancelled_stream_builds_only_its_prefetch(
    executor: ThreadExecutor, tmp_path: Path
) -> None:
    # The client stops reading after the first message; the stream is then cancelled.
    client = _Client()
    built: list[BuiltBatch] = []

    async def scenario() -> None:
        client.block.clear()
        task = asyncio.create_task(_stream(executor, "counted", client, built=built).run())
        while not built:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # time for the executor to build whatever it was given
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    executor.close()
    loaded = (tmp_path / "built.txt").read_text().split()
    # prefetch_batches=4: the batch being written and at most 4 more, never all 25.
    assert len(loaded) <= 5 * 8
    assert all(len(batch.payload) == 0 for batch in built)


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (ExecutorFailed("no worker left"), grpc.StatusCode.UNAVAILABLE),
        (ExecutorClosed("closed"), grpc.StatusCode.UNAVAILABLE),
        (Draining("draining"), grpc.StatusCode.UNAVAILABLE),
        (BatchFailed("dataset 'd', sample index 3: boom"), grpc.StatusCode.INTERNAL),
        (WorkerCrashed("died"), grpc.StatusCode.INTERNAL),
        (TaskTimedOut("took too long"), grpc.StatusCode.INTERNAL),
        (BatchTooLarge("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RuntimeError("an executor's bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_one_table_maps_failures_to_statuses(failure: BaseException, code) -> None:
    assert failure_status(failure, 7)[0] == code


def test_a_failed_executor_says_where_to_resume() -> None:
    _, message = failure_status(ExecutorFailed("no worker left"), 7)
    assert "no worker left" in message and "resume at batch 7" in message
