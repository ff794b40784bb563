"""Streams cancelled by the other side (a draining server, a proxy): the client resumes.

``server.stop`` drains for ``grace_seconds`` but a stream whose client reads
slowly is blocked sending a chunk and never sees the drain deadline; grpcio's
final ``stop(1.0)`` then cancels it. grpcio 1.85 reports that to the client as
UNAVAILABLE ("Cancelling all calls"); a proxy resetting a stream, or other
grpc versions, give CANCELLED, a status the client never causes itself before
a stream ends, so it reconnects on both.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serverproc import ServerProcess, free_port
from client_support import FAST_RETRY, RESUME_CONFIG
from relay import Relay

from batchwire.client import RemoteDataset

BIG_CONFIG = """
[server]
grace_seconds = 0.5
chunk_bytes = 1048576
prefetch_batches = 2

[datasets.big]
source = "synthetic"
length = 24
seed = 11
fields.x = { shape = [1024, 1024], dtype = "float32" }
fields.label = { shape = [], dtype = "int64", high = 1000000 }
"""

STALL_AFTER = 3  # batches read before the SIGTERM; the epoch has 24 of 4 MiB


@pytest.fixture
def big_server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "big.toml"
    config.write_text(BIG_CONFIG)
    server = ServerProcess(config, port=free_port(), workers=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def digest(batch) -> str:
    h = hashlib.sha256(batch["x"].numpy().tobytes())
    h.update(batch["label"].numpy().tobytes())
    return h.hexdigest()


def test_a_stream_cancelled_by_the_draining_server_is_resumed(
    big_server: ServerProcess, caplog: pytest.LogCaptureFixture
):
    expected = [digest(b) for b in RemoteDataset(big_server.target, "big", batch_size=1)]
    assert len(set(expected)) == 24
    # Bytes: the stream must sit in gRPC flow control (shared memory would not).
    ds = RemoteDataset(big_server.target, "big", batch_size=1, retry=FAST_RETRY, transport="grpc")
    received: list[str] = []
    restart = None
    with caplog.at_level(logging.WARNING, logger="batchwire.client"):
        for count, batch in enumerate(ds, start=1):
            received.append(digest(batch))
            if count == STALL_AFTER:
                draining = big_server.process
                draining.send_signal(15)  # graceful stop, mid-epoch
                restart = threading.Thread(
                    target=lambda old=draining: (old.wait(60), big_server.start()), daemon=True
                )
                restart.start()
                # A slow trainer: the stream sits in flow control until the old server,
                # past its grace, has cancelled it and exited (a count, not a clock).
                draining.wait(60)
    assert restart is not None
    restart.join(timeout=60)
    assert received == expected  # every batch once, in order
    broke = [r.getMessage() for r in caplog.records if "stream broke" in r.getMessage()]
    # The drain really cut the stream: stuck in flow control, it was cancelled.
    assert broke, "the stream was never cut"
    assert "Cancelling all calls" in broke[0] or "CANCELLED" in broke[0], broke


def test_a_stream_cancelled_by_a_proxy_is_resumed(tmp_path: Path):
    config = tmp_path / "resume.toml"
    config.write_text(RESUME_CONFIG)
    with ServerProcess(config) as server, Relay(server.target) as relay:
        expected = [b["index"].tolist() for b in RemoteDataset(server.target, "slow", batch_size=2)]
        relay.break_stream(after_frames=30, how="cancel")
        ds = RemoteDataset(relay.target, "slow", batch_size=2, retry=FAST_RETRY)
        assert [b["index"].tolist() for b in ds] == expected
        assert relay.cut_streams == 1
