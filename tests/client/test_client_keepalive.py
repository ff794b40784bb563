"""A server that stops answering without closing the connection (SIGSTOP, as a host
that vanished behind a partition): keepalive pings notice, and the client reconnects."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serverproc import ServerProcess, free_port
from client_support import CLIENT_TESTS_DIR, FAST_RETRY

from batchwire.client import RemoteDataset

KEEPALIVE = 1.0  # seconds between pings, and to wait for an answer, in this test
FREEZE_AFTER = 3  # batches received before the freeze; the epoch has 60

# Slow enough (~3 s an epoch) that the epoch is still being built at the freeze, even
# when the test itself is held up a second or two around it on a loaded machine.
SLOW_CONFIG = f"""
[server]
python_path = ["{CLIENT_TESTS_DIR.parent}", "{CLIENT_TESTS_DIR}"]
prefetch_batches = 2

[datasets.slow]
source = "python"
factory = "slow_datasets:slow_indexed"
kwargs = {{ length = 120, delay = 0.05 }}
"""


@pytest.fixture
def frozen_server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "slow.toml"
    config.write_text(SLOW_CONFIG)
    server = ServerProcess(config, port=free_port())
    server.start()
    try:
        yield server
    finally:
        os.kill(server.pid(), signal.SIGCONT)  # a stopped process would ignore SIGTERM
        server.stop()


class _BrokeHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.broke = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "stream broke" in record.getMessage():
            self.broke.set()


def test_a_frozen_server_is_noticed_within_keepalive_time_and_timeout(
    frozen_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BATCHWIRE_KEEPALIVE_SECONDS", str(KEEPALIVE))
    monkeypatch.setenv("BATCHWIRE_KEEPALIVE_TIMEOUT_SECONDS", str(KEEPALIVE))
    reference = RemoteDataset(frozen_server.target, "slow", batch_size=2, shuffle=True, seed=3)
    expected = [i for batch in reference for i in batch["index"].tolist()]
    handler = _BrokeHandler()
    logger = logging.getLogger("batchwire.client")
    logger.addHandler(handler)
    frozen_at: list[float] = []
    noticed_after: list[float] = []

    def thaw_once_noticed() -> None:
        # Without keepalive the client would wait forever; thaw after 20 s regardless.
        if handler.broke.wait(20.0):
            noticed_after.append(time.monotonic() - frozen_at[0])
        os.kill(frozen_server.pid(), signal.SIGCONT)

    ds = RemoteDataset(
        frozen_server.target, "slow", batch_size=2, shuffle=True, seed=3, retry=FAST_RETRY
    )
    received: list[int] = []
    thaw = threading.Thread(target=thaw_once_noticed, daemon=True)
    try:
        for count, batch in enumerate(ds, start=1):
            received.extend(batch["index"].tolist())
            if count == FREEZE_AFTER:
                os.kill(frozen_server.pid(), signal.SIGSTOP)
                frozen_at.append(time.monotonic())
                thaw.start()
    finally:
        logger.removeHandler(handler)
        thaw.join(timeout=30)
    assert noticed_after, "the client never noticed that the server stopped answering"
    # A ping within KEEPALIVE of the last frame, KEEPALIVE for its answer, and slack
    # for the batches already received and a busy machine; without keepalive the
    # client would never notice (the thaw comes after 20 s regardless).
    assert noticed_after[0] < 2 * KEEPALIVE + 10.0
    assert received == expected  # and it resumed exactly once the server answered again


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_a_bad_keepalive_setting_is_refused_by_name(value: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BATCHWIRE_KEEPALIVE_TIMEOUT_SECONDS", value)
    ds = RemoteDataset(f"127.0.0.1:{free_port()}", "slow", batch_size=2)
    with pytest.raises(
        ValueError, match="BATCHWIRE_KEEPALIVE_TIMEOUT_SECONDS should be a positive"
    ):
        next(iter(ds))
