"""A worker SIGKILLed mid-stream is replaced, its batch rebuilt, the stream completes (real server)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _serverproc import ServerProcess
from pipeline_data import batches, worker_pids

from batchwire.client import BatchClient, ServerError
from batchwire.v1 import batchwire_pb2 as pb

HERE = Path(__file__).resolve().parent

CONFIG = f"""
[server]
python_path = ["{HERE}"]
prefetch_batches = 4

[datasets.slow]
source = "python"
factory = "pipeline_data:slow_range"
kwargs = {{ length = 80, delay = 0.01 }}

[datasets.picky]
source = "python"
factory = "pipeline_data:slow_range"
kwargs = {{ length = 20, delay = 0.0 }}
transforms = [{{ name = "pipeline_data:reject_seven" }}]
"""

WORKERS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("crash") / "crash.toml"
    path.write_text(CONFIG)
    with ServerProcess(path, workers=WORKERS) as server:
        yield server


def wait_for_workers(server_pid: int, count: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = worker_pids(server_pid)
        if len(pids) == count or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def test_sigkilled_worker_is_replaced_and_stream_completes(server):
    before = wait_for_workers(server.pid(), WORKERS)
    assert len(before) == WORKERS, f"expected {WORKERS} workers, found {before}"
    request = pb.StreamBatchesRequest(dataset="slow", batch_size=4, world_size=1)
    received: list[tuple[int, torch.Tensor]] = []
    victim = before[0]
    for position, batch in BatchClient(server.target).batches(request):
        received.append((position, batch))
        if len(received) == 2:
            os.kill(victim, signal.SIGKILL)  # mid-stream: both workers hold batches now
    assert [position for position, _ in received] == list(range(20))
    for position, batch in received:
        index = torch.arange(position * 4, position * 4 + 4)
        assert torch.equal(batch, torch.stack([index, index * index], dim=1)), position
    after = wait_for_workers(server.pid(), WORKERS)
    assert len(after) == WORKERS and victim not in after, (before, after)
    deaths = [line for line in server.output if "died with exit code -9" in line]
    assert deaths and re.search(r"rebuilding [1-9]\d* batch", deaths[0]), deaths
    # The replacement serves new streams too.
    assert len(batches(server.target, "slow", batch_size=40)) == 2


def test_a_raising_transform_ends_only_its_stream_with_internal(server):
    with pytest.raises(ServerError) as info:
        batches(server.target, "picky", batch_size=4)
    message = str(info.value)
    assert info.value.code.name == "INTERNAL"
    assert "'picky'" in message and "sample index 7" in message
    assert "seven is not allowed" in message
    assert len(batches(server.target, "picky", batch_size=4, end_batch=1)) == 1
    assert len(worker_pids(server.pid())) == WORKERS
