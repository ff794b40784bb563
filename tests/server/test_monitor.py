"""The monitor's arithmetic (issue 16): rates between two snapshots, histogram percentiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchwire.server.config import ConfigError, load_config
from batchwire.server.metrics import Metrics, transport_of
from batchwire.server.monitor import _percentiles, rates, snapshot


def test_percentiles_interpolate_within_buckets() -> None:
    buckets = {0.01: 0.0, 0.1: 100.0, float("inf"): 100.0}
    p50, p99 = _percentiles(buckets, (0.5, 0.99))
    assert p50 == pytest.approx(0.055)
    assert p99 == pytest.approx(0.0991)
    assert _percentiles({0.1: 0.0, float("inf"): 0.0}, (0.5,)) == [None]
    assert _percentiles({0.1: 0.0, float("inf"): 4.0}, (0.5,)) == [0.1]  # past the last bound


def test_rates_between_snapshots() -> None:
    metrics = Metrics()
    before = snapshot(metrics.registry)
    meter = metrics.open_stream("7", "digits", "ipv4:127.0.0.1:5000", "none")
    for _ in range(20):
        meter.built(0.05)
        meter.sent(1000)
    meter.waited(0.5)
    meter.set_depth(3)
    after = snapshot(metrics.registry)
    r = rates(before, after, 2.0)
    assert r.batches_per_s == 10.0 and r.bytes_per_s == 10_000.0
    assert r.datasets == {"digits": 10.0}
    assert r.busy_fraction == pytest.approx(0.5)  # 1 s of builds in 2 s, one worker assumed
    assert r.worker_wait_per_s == pytest.approx(0.25)
    assert r.queue_depth == 3 and r.streams == 1
    assert 0.025 <= r.build_p50 <= 0.05
    assert "10.0 batches/s" in r.line() and "digits 10.0/s" in r.line()
    meter.close()
    closed = snapshot(metrics.registry)
    assert closed[("batchwire_queue_depth", (("dataset", "digits"),))] == 0
    assert closed[("batchwire_active_streams", ())] == 0
    assert metrics.open_streams() == []


def test_transport_of_peer() -> None:
    assert transport_of("ipv4:127.0.0.1:1") == transport_of("ipv6:[::1]:1") == "tcp"
    assert transport_of("unix:/tmp/s") == "unix"
    assert transport_of("weird") == "other"


def test_summary_seconds_must_not_be_negative(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nsummary_seconds = -1\n[datasets.d]\nsource = "synthetic"\nlength = 4\n'
        'fields.x = { shape = [2], dtype = "float32" }\n'
    )
    with pytest.raises(ConfigError, match="summary_seconds"):
        load_config(config)


def test_trainer_reports_ignore_nonsense() -> None:
    metrics = Metrics()
    for wait, compute in ((float("nan"), 1.0), (-1.0, 1.0), (1.0, float("inf")), (0.0, 0.0)):
        metrics.trainer_reported("d", wait, compute)
    assert metrics.trainer_reports == {}
    metrics.trainer_reported("d", 1.0, 3.0)
    assert metrics.trainer_reports == {"d": (0.25, 1)}
