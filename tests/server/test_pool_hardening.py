"""The worker pool under abuse (real server): cancelled streams, failed writes, hung items."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from _serverproc import ServerProcess

from batchwire.client import BatchClient, ServerError
from batchwire.server.pool import AHEAD
from batchwire.v1 import batchwire_pb2 as pb
from batchwire.v1 import batchwire_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from pipeline_data import worker_pids  # the pipeline tests' helper, not a copy

HERE = Path(__file__).resolve().parent
WORKERS = 2
BATCH = 2  # samples per batch


def request(dataset: str, **fields) -> pb.StreamBatchesRequest:
    fields.setdefault("batch_size", BATCH)
    return pb.StreamBatchesRequest(dataset=dataset, world_size=1, **fields)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_for_workers(server_pid: int, count: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := worker_pids(server_pid)) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def built(counter: Path) -> int:
    """Items the workers have loaded so far (one line each)."""
    return len(counter.read_text().splitlines()) if counter.exists() else 0


# -- 1. cancelled streams leave no work behind --------------------------------


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("cancel")
    counter = root / "built.txt"
    config = root / "cancel.toml"
    config.write_text(
        f"""
[server]
python_path = ["{HERE}"]
prefetch_batches = 4

[datasets.slow]
source = "python"
factory = "pool_data:counted_slow_range"
kwargs = {{ length = 400, delay = 0.1, counter = "{counter}" }}
"""
    )
    with ServerProcess(config, workers=WORKERS) as server:
        yield server, counter


def test_cancelled_streams_do_not_keep_workers_busy(slow_server):
    server, counter = slow_server
    streams = 12  # x prefetch 4 = 48 batches queued: ~5 s of work for 2 workers
    with grpc.insecure_channel(server.target) as channel:
        stub = batchwire_pb2_grpc.BatchServiceStub(channel)
        calls = [stub.StreamBatches(request("slow", seed=i, shuffle=True)) for i in range(streams)]
        wait_until(
            lambda: sum("stream start" in line for line in server.output) >= streams,
            10,
            "the streams to start",
        )
        for call in calls:
            call.cancel()
    wait_until(
        lambda: sum("status=CANCELLED" in line for line in server.output) >= streams,
        10,
        "the server to end the cancelled streams",
    )
    before = built(counter)
    started = time.monotonic()
    received = list(BatchClient(server.target).batches(request("slow", end_batch=4)))
    seconds = time.monotonic() - started
    assert [position for position, _ in received] == [0, 1, 2, 3]
    time.sleep(1.0)  # anything still queued would be built now
    leftover = built(counter) - before - 4 * BATCH
    # Once the streams ended, only the batches already in the workers' pipes get built.
    assert leftover <= WORKERS * AHEAD * BATCH, f"{leftover} items built for cancelled streams"
    # The leftover count above is the check; 4 batches of 0.2 s on 2 workers take about
    # a second on an idle machine, and this only bounds a hang (a busy one is slower).
    assert seconds < 60.0, f"a fresh stream took {seconds:.1f}s behind cancelled ones"


# -- 2. no payload file outlives its batch -------------------------------------


def payload_files(shm: Path, pid: int) -> list[str]:
    return sorted(path.name for path in shm.glob(f"batchwire-{pid}-*"))


def test_payload_files_of_dead_servers_and_failed_writes_are_removed(tmp_path: Path):
    shm = tmp_path / "shm"
    shm.mkdir()
    gone = subprocess.Popen(["true"])  # a pid that no longer runs: a SIGKILLed server's
    gone.wait()
    leftovers = [shm / f"batchwire-{gone.pid}-7f00aa-{i}" for i in range(3)]
    alive = shm / f"batchwire-{os.getpid()}-7f00bb-0"  # a running server's batch: kept
    other = shm / "someone-elses-file"
    for path in [*leftovers, alive, other]:
        path.write_bytes(b"x" * 100)
    config = tmp_path / "shm.toml"
    config.write_text(
        f"""
[server]
python_path = ["{HERE}"]
shm_dir = "{shm}"

[datasets.partial]
source = "python"
factory = "pool_data:file_size_limited"
kwargs = {{ length = 40 }}
"""
    )
    with ServerProcess(config, workers=WORKERS) as server:
        assert not any(path.exists() for path in leftovers), sorted(p.name for p in shm.iterdir())
        assert alive.exists() and other.exists()
        with pytest.raises(ServerError) as info:
            list(BatchClient(server.target).batches(request("partial", batch_size=4)))
        assert info.value.code == grpc.StatusCode.INTERNAL, info.value
        assert "'partial'" in str(info.value)
        # The stream's other batches may still be in the workers; each fails the same way.
        wait_until(lambda: not payload_files(shm, server.pid()), 10, "partial payloads removed")


# -- 4. a hung item costs one stream, not the server ---------------------------


def test_a_hung_item_ends_its_stream_and_the_pool_recovers(tmp_path: Path):
    config = tmp_path / "hang.toml"
    config.write_text(
        f"""
[server]
python_path = ["{HERE}"]
task_timeout_seconds = 2

[datasets.hang]
source = "python"
factory = "pool_data:hangs_at"
kwargs = {{ length = 40, hang = 9 }}
"""
    )
    with ServerProcess(config, workers=WORKERS) as server:
        before = wait_for_workers(server.pid(), WORKERS)
        others: list[list] = []
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            for position, _ in BatchClient(server.target).batches(request("hang", batch_size=4)):
                if position == 0:  # meanwhile, a stream that avoids the hung item goes on
                    others.append(
                        list(BatchClient(server.target).batches(request("hang", end_batch=4)))
                    )
        seconds = time.monotonic() - started
        message = str(info.value)
        assert info.value.code == grpc.StatusCode.INTERNAL, info.value
        assert "'hang'" in message and "sample index 8" in message, message
        assert "task_timeout_seconds=2" in message, message
        # A bound on a hang (the stuck item sleeps an hour), generous for a busy machine.
        assert seconds < 60, f"the stuck stream took {seconds:.1f}s to end"
        assert [len(batches) for batches in others] == [4]

        # The stuck worker was killed and replaced; the server serves on, at full size.
        def replaced() -> bool:
            pids = worker_pids(server.pid())
            return len(pids) == WORKERS and set(pids) != set(before)

        wait_until(replaced, 20, f"the killed worker of {before} to be replaced")
        assert len(list(BatchClient(server.target).batches(request("hang", end_batch=4)))) == 4
        assert any("took longer than task_timeout_seconds" in line for line in server.output)


# -- 3. re-dispatch after a death: tasks larger than a pipe's buffer ------------


def test_tasks_larger_than_a_pipe_buffer_survive_a_killed_worker(tmp_path: Path):
    # 10000 int64 indices: an 80 KB task, more than the 64 KB a pipe holds, so the
    # send of a worker's second task blocks until it finishes its first (or dies).
    config = tmp_path / "large.toml"
    config.write_text(
        f"""
[server]
python_path = ["{HERE}"]

[datasets.range]
source = "python"
factory = "pool_data:hangs_at"
kwargs = {{ length = 60000, hang = -1 }}
"""
    )
    with ServerProcess(config, workers=WORKERS) as server:
        before = wait_for_workers(server.pid(), WORKERS)
        assert len(before) == WORKERS, before
        received = []
        for position, batch in BatchClient(server.target).batches(
            request("range", batch_size=10000)
        ):
            received.append((position, batch))
            if position == 0:
                os.kill(before[0], signal.SIGKILL)  # it holds a batch and a blocked send
        assert [position for position, _ in received] == list(range(6))
        for position, batch in received:
            expected = torch.arange(position * 10000, (position + 1) * 10000).unsqueeze(1)
            assert torch.equal(batch, expected), position
        deaths = [line for line in server.output if "died with exit code -9" in line]
        assert deaths and re.search(r"rebuilding [1-9]\d* batch", deaths[0]), deaths
        # Small streams go on beside the replacement.
        assert len(list(BatchClient(server.target).batches(request("range", end_batch=3)))) == 3
