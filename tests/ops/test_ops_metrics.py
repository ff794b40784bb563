"""The Prometheus endpoint: counters move after streams, errors are counted by code."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from _serverproc import ServerProcess, free_port
from ops_support import scrape
from test_ops_health import write_config

from batchwire import wire
from batchwire.client import RemoteDataset, ServerError


def test_metrics_move_after_a_stream(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = write_config(tmp_path)
    with ServerProcess(config, workers=2, extra=["--metrics-port", str(metrics_port)]) as server:
        before = scrape(metrics_port)
        assert before[("batchwire_active_streams", ())] == 0
        assert before[("batchwire_workers_alive", ())] == 2

        batches = list(RemoteDataset(server.target, "dict", batch_size=10))
        with pytest.raises(ServerError) as missing:
            list(RemoteDataset(server.target, "nope", batch_size=10))
        assert missing.value.code == grpc.StatusCode.NOT_FOUND

        after = scrape(metrics_port)
        dataset = (("dataset", "dict"),)
        assert after[("batchwire_batches_sent_total", dataset)] == len(batches) == 7
        # Payload bytes: the tensors, each starting at a 64-byte aligned offset.
        payload = sum(wire.layout(wire.flatten(batch)[0])[1] for batch in batches)
        assert after[("batchwire_bytes_sent_total", dataset)] == payload
        # The warm-up builds one batch per worker too, but only streams are observed.
        assert after[("batchwire_batch_build_seconds_count", dataset)] == 7
        assert after[("batchwire_worker_busy_seconds_total", ())] > 0
        assert after[("batchwire_errors_total", (("code", "NOT_FOUND"),))] == 1
        assert after[("batchwire_active_streams", ())] == 0
        assert after[("batchwire_workers_replaced_total", ())] == 0
        # No series per stream (issue 16): no label names one, and the queue is empty.
        assert not [key for key in after if any(name == "stream" for name, _ in key[1])]
        assert after[("batchwire_queue_depth", dataset)] == 0


def test_a_taken_metrics_port_stops_serve_with_a_message(tmp_path: Path) -> None:
    import socket
    import subprocess

    from _serverproc import batchwire_command

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                *batchwire_command(),
                "serve",
                "--config",
                str(write_config(tmp_path)),
                "--port",
                "0",
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
