"""Issue 16, server side: bounded metric series, the periodic summary, the dashboard's data."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _serverproc import ServerProcess, free_port
from ops_support import scrape
from test_ops_health import write_config

from batchwire.client import BatchClient
from batchwire.v1 import batchwire_pb2 as pb

STREAMS = 1000


def _one_stream(target: str) -> int:
    request = pb.StreamBatchesRequest(dataset="dict", batch_size=64, world_size=1)
    return sum(1 for _ in BatchClient(target).batches(request))


def _scrape_while_streams_run(port: int, seen: set) -> None:
    """Scrapes into ``seen`` 30 times, while the streams run."""
    for _ in range(30):
        seen |= set(scrape(port))
        time.sleep(0.05)


def test_series_stay_bounded_across_1000_streams_and_serve_logs_a_summary(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = write_config(tmp_path, "summary_seconds = 1")
    with ServerProcess(config, workers=2, extra=["--metrics-port", str(metrics_port)]) as server:
        assert _one_stream(server.target) == 1
        series = set(scrape(metrics_port))
        # Prometheus keeps every series it ever scraped: scrape while streams run too.
        seen: set = set()
        with ThreadPoolExecutor(5) as threads:
            streams = threads.map(lambda _: _one_stream(server.target), range(STREAMS - 1))
            scrapes = threads.submit(_scrape_while_streams_run, metrics_port, seen)
            sent = sum(streams)
            scrapes.result()
        assert sent == STREAMS - 1
        after = scrape(metrics_port)
        seen |= set(after)
        # No series per stream: only the series there were after the first stream.
        assert seen == series, sorted(seen ^ series)[:20]
        dataset = (("dataset", "dict"),)
        assert after[("batchwire_batches_sent_total", dataset)] == STREAMS
        assert after[("batchwire_queue_depth", dataset)] == 0
        tcp = (("compression", "none"), ("transport", "tcp"))
        assert (
            after[("batchwire_transport_bytes_sent_total", tcp)]
            == after[("batchwire_bytes_sent_total", dataset)]
        )

        # The monitor samples once a second: the dashboard's data shows the streams' rate.
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/dashboard/data", timeout=5
            ) as reply:
                data = json.load(reply)
            if sum(s["datasets"].get("dict", 0.0) * s["seconds"] for s in data["samples"]) > 0:
                break
            assert time.monotonic() < deadline, data
            time.sleep(0.5)
        assert data["streams"] == []  # all ended
        assert all(0.0 <= s["busy_fraction"] <= 1.0 for s in data["samples"])

        # summary_seconds = 1: the serve log has the one-line summary.
        while not any("summary last" in line for line in server.output):
            assert time.monotonic() < deadline, server.output[-20:]
            time.sleep(0.2)
    summaries = [line for line in server.output if "summary last" in line]
    assert any("batches/s" in line and "workers busy" in line for line in summaries), summaries


def test_trainers_report_their_data_wait_to_the_server(tmp_path: Path) -> None:
    from batchwire.client import RemoteDataset

    metrics_port = free_port()
    config = write_config(tmp_path)
    with ServerProcess(config, workers=1, extra=["--metrics-port", str(metrics_port)]) as server:
        ds = RemoteDataset(server.target, "dict", batch_size=16)
        assert sum(1 for _ in ds) == 4
        first = ds.stats()
        assert ("batchwire_trainer_data_wait_seconds_total", (("dataset", "dict"),)) not in scrape(
            metrics_port
        )
        assert sum(1 for _ in ds) == 4  # this pass's request carries the first pass's figures
        after = scrape(metrics_port)
        dataset = (("dataset", "dict"),)
        assert after[("batchwire_trainer_data_wait_seconds_total", dataset)] == first.wait_seconds
        assert after[("batchwire_trainer_compute_seconds_total", dataset)] == first.compute_seconds
        with urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/dashboard/data", timeout=5
        ) as reply:
            trainers = json.load(reply)["trainers"]
        assert trainers["dict"]["reports"] == 1
        assert trainers["dict"]["data_wait_fraction"] == first.data_wait_fraction
