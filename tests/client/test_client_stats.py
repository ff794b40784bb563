"""Issue 16: the trainer sees where its time goes (data wait vs compute) and why.

A real server; a slow dataset with a fast loop must read as data-bound on the
server's workers, a fast dataset with a slow loop as compute-bound, a slow link
(a relay that delays each frame) as network-bound. Fractions are asserted
generously; nothing depends on the machine being idle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from _serverproc import ServerProcess
from client_support import CLIENT_TESTS_DIR, FAST_RETRY
from relay import Relay

from batchwire.client import RemoteDataset, StreamStats, enable_metrics
from batchwire.client import _stats as stats_module

CONFIG = f"""
[server]
python_path = ["{CLIENT_TESTS_DIR.parent}", "{CLIENT_TESTS_DIR}"]
prefetch_batches = 2

[datasets.slow]
source = "python"
factory = "slow_datasets:slow_indexed"
kwargs = {{ length = 48, delay = 0.02 }}

[datasets.fast]
source = "python"
factory = "sample_datasets:indexed_dict"
kwargs = {{ length = 80 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("stats") / "stats.toml"
    config.write_text(CONFIG)
    with ServerProcess(config, workers=1) as server:
        yield server


def _epoch_line(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if "data wait" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


def test_slow_dataset_fast_loop_is_data_bound_on_server_workers(
    server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    ds = RemoteDataset(server.target, "slow", batch_size=4)
    with caplog.at_level(logging.INFO, logger="batchwire.client"):
        batches = sum(1 for _ in ds)
    stats = ds.stats()
    assert isinstance(stats, StreamStats)
    assert batches == stats.batches == 12
    assert stats.epoch == 0 and stats.reconnects == 0 and stats.bytes > 0
    assert stats.transport == ("shm" if ds.transport == "shm" else "grpc/tcp")
    assert stats.data_wait_fraction >= 0.8, stats
    # 4 samples x 20 ms per batch on one worker: the server waited on it.
    assert stats.build_seconds >= 12 * 4 * 0.02 * 0.9, stats
    assert stats.server_wait_seconds > 0.5 * stats.wait_seconds, stats
    assert stats.bottleneck == stats_module.WORKERS
    line = _epoch_line(caplog)
    assert "dataset 'slow' epoch 0: data wait" in line
    assert "bottleneck: server workers busy" in line, line


def test_fast_dataset_slow_loop_is_compute_bound(
    server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    ds = RemoteDataset(server.target, "fast", batch_size=4)
    with caplog.at_level(logging.INFO, logger="batchwire.client"):
        last = None
        for batch in ds:
            time.sleep(0.1)  # the "training step"
            live, last = ds.stats(), batch  # live figures during the pass
        assert live.batches >= 19 and live.compute_seconds > 0
    stats = ds.stats()
    assert stats.batches == 20
    assert stats.data_wait_fraction <= 0.4, stats  # the first batch waits for the stream to start
    assert stats.compute_seconds >= 20 * 0.1 * 0.9
    assert stats.bottleneck == stats_module.COMPUTE
    line = _epoch_line(caplog)
    assert "bottleneck: training loop compute" in line, line
    assert last is not None and last["index"].tolist() == [76, 77, 78, 79]


class _SlowLink(Relay):
    """A relay that holds every frame a while: a slow network between trainer and server."""

    delay = 0.05

    def _stream(self, request, context):
        for frame in super()._stream(request, context):
            time.sleep(self.delay)
            yield frame


def test_slow_link_is_network_bound_and_reconnects_are_counted(
    server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    with _SlowLink(server.target) as relay:
        relay.break_stream(after_frames=5, how="cancel")
        ds = RemoteDataset(relay.target, "fast", batch_size=4, retry=FAST_RETRY)
        with caplog.at_level(logging.INFO, logger="batchwire.client"):
            assert sum(1 for _ in ds) == 20
    stats = ds.stats()
    assert stats.reconnects == 1
    assert stats.data_wait_fraction >= 0.8, stats
    assert stats.bottleneck == stats_module.NETWORK, stats
    assert "bottleneck: network" in _epoch_line(caplog)


def test_trainer_prometheus_metrics_are_opt_in(server: ServerProcess) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    enable_metrics(registry)
    try:
        ds = RemoteDataset(server.target, "fast", batch_size=8)
        assert sum(1 for _ in ds) == 10
        value = registry.get_sample_value
        assert value("batchwire_client_batches_total", {"dataset": "fast"}) == 10
        assert value("batchwire_client_data_wait_seconds_total", {"dataset": "fast"}) > 0
        fraction = value("batchwire_client_data_wait_fraction", {"dataset": "fast"})
        assert fraction == pytest.approx(ds.stats().data_wait_fraction)
    finally:
        stats_module._exported = None


def test_stats_survive_pickling_into_a_dataloader_worker(server: ServerProcess) -> None:
    import pickle

    ds = RemoteDataset(server.target, "fast", batch_size=8)
    copy = pickle.loads(pickle.dumps(ds))
    assert sum(1 for _ in copy) == 10
    assert copy.stats().batches == 10 and ds.stats().batches == 0


def test_stats_line_names_each_bottleneck() -> None:
    base = StreamStats("d", 3, batches=10, wait_seconds=9.0, compute_seconds=1.0)
    assert base.data_wait_fraction == pytest.approx(0.9)
    assert (
        StreamStats("d", 3, wait_seconds=1.0, compute_seconds=9.0).bottleneck
        == "training loop compute"
    )
    workers = StreamStats("d", 3, wait_seconds=9.0, compute_seconds=1.0, server_wait_seconds=8.0)
    decode = StreamStats("d", 3, wait_seconds=9.0, compute_seconds=1.0, decode_seconds=8.0)
    assert workers.bottleneck == stats_module.WORKERS
    assert decode.bottleneck == stats_module.DECODE
    assert base.bottleneck == stats_module.NETWORK
    assert "data wait 90% of step time" in base.line()
