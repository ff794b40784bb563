"""Requests cannot pin server memory: the plan cache is bounded by bytes (real server, RSS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _serverproc import ServerProcess

from batchwire.client import BatchClient
from batchwire.server.config import ServerConfig
from batchwire.v1 import batchwire_pb2 as pb

MIB = 1 << 20
DRAW = 1 << 25  # samples per request: a 256 MiB plan (8 bytes each)
SLACK = 256 * MIB  # allocator and interpreter noise around the budget

CONFIG = """
[datasets.noise]
source = "synthetic"
length = 1000
fields.x = { shape = [4] }
"""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("memory") / "memory.toml"
    config.write_text(CONFIG)  # the default plan_cache_bytes: what the README states
    with ServerProcess(config, workers=1) as process:
        yield process


def count(client: BatchClient, seed: int) -> pb.BatchCount:
    request = pb.StreamBatchesRequest(
        dataset="noise",
        batch_size=1024,
        world_size=1,
        seed=seed,
        sampler=pb.SamplerSpec(kind="random", num_samples=DRAW),
    )
    return client.count_batches(request)


def test_big_requests_with_new_seeds_keep_rss_within_the_plan_budget(server):
    client = BatchClient(server.target, timeout=120)
    count(client, seed=0)  # the first draw loads torch's code paths: part of the baseline
    baseline = rss_bytes(server.pid())
    budget = ServerConfig().plan_cache_bytes
    grown = []
    for seed in range(1, 9):  # 8 plans of 256 MiB: 2 GiB if every one were kept
        assert count(client, seed).num_samples == DRAW
        grown.append(rss_bytes(server.pid()) - baseline)
    assert max(grown) <= budget + SLACK, (
        f"server RSS grew by {[g // MIB for g in grown]} MiB over a baseline of "
        f"{baseline // MIB} MiB; the bound is plan_cache_bytes ({budget // MIB} MiB) + "
        f"{SLACK // MIB} MiB"
    )
