"""A server killed with SIGKILL mid-epoch and restarted: the client finishes the epoch exactly once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serverproc import ServerProcess, free_port
from client_support import FAST_RETRY, RESUME_CONFIG

from batchwire.client import RemoteDataset, RetryError, RetryPolicy, ServerError


@pytest.fixture(scope="session")
def resume_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "resume.toml"
    path.write_text(RESUME_CONFIG)
    return path


@pytest.fixture
def killable_server(resume_config: Path) -> Iterator[ServerProcess]:
    """A server on a fixed port of its own, so that a restart comes back on the same target."""
    server = ServerProcess(resume_config, port=free_port(), workers=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


KILL_AFTER = 30  # batches received before the kill; the epoch has 120


def expected_indices(target: str, **kwargs) -> list[int]:
    reference = RemoteDataset(target, "slow", batch_size=2, shuffle=True, seed=3, **kwargs)
    return [i for batch in reference for i in batch["index"].tolist()]


def restart_in_background(server: ServerProcess) -> threading.Thread:
    """SIGKILL now; start again on the same port from another thread (takes seconds)."""
    server.kill()
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("streams", [1, 4])
def test_client_finishes_the_epoch_across_a_server_kill_and_restart(
    killable_server: ServerProcess, streams: int, caplog: pytest.LogCaptureFixture
):
    expected = expected_indices(killable_server.target)
    assert sorted(expected) == list(range(240))
    ds = RemoteDataset(
        killable_server.target,
        "slow",
        batch_size=2,
        shuffle=True,
        seed=3,
        streams=streams,
        retry=FAST_RETRY,
    )
    received: list[int] = []
    restart = None
    with caplog.at_level(logging.WARNING, logger="batchwire.client"):
        for count, batch in enumerate(ds, start=1):
            received.extend(batch["index"].tolist())
            if count == KILL_AFTER:
                restart = restart_in_background(killable_server)
    assert restart is not None
    restart.join(timeout=60)
    assert received == expected  # every sample of the epoch, once, in order
    # The kill really cut a stream short: the client had to reconnect.
    assert any("stream broke" in record.getMessage() for record in caplog.records)
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["batch"] == 0


def test_client_resumes_after_a_graceful_shutdown(killable_server: ServerProcess):
    # SIGTERM: the server ends the stream with UNAVAILABLE ("resume at batch N").
    expected = expected_indices(killable_server.target)
    ds = RemoteDataset(
        killable_server.target, "slow", batch_size=2, shuffle=True, seed=3, retry=FAST_RETRY
    )
    received: list[int] = []
    restart = None
    for count, batch in enumerate(ds, start=1):
        received.extend(batch["index"].tolist())
        if count == KILL_AFTER:
            killable_server.process.send_signal(15)
            restart = threading.Thread(
                target=lambda: (killable_server.process.wait(30), killable_server.start()),
                daemon=True,
            )
            restart.start()
    restart.join(timeout=60)
    assert received == expected


def test_spent_retry_budget_says_what_was_tried():
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(attempts=3, deadline=30.0, initial_backoff=0.01, max_backoff=0.05)
    ds = RemoteDataset(dead, "slow", batch_size=2, retry=policy)
    started = time.monotonic()
    with pytest.raises(RetryError) as caught:
        for _ in ds:
            pass
    error = caught.value
    assert time.monotonic() - started < 5
    assert error.attempts == 3
    assert error.last_error.code.name == "UNAVAILABLE"
    message = str(error)
    assert "gave up on dataset 'slow' epoch 0 rank 0/1 batches 0::1 at batch 0" in message
    assert "after 3 reconnect attempt(s)" in message
    assert "attempts=3" in message and "UNAVAILABLE" in message
    # The failed position is kept: iterating again resumes there rather than moving on.
    assert ds.state_dict()["epoch"] == 0 and ds.state_dict()["batch"] == 0


def test_retry_deadline_bounds_the_outage():
    dead = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy(attempts=10_000, deadline=0.5, initial_backoff=0.01, max_backoff=0.05)
    ds = RemoteDataset(dead, "indexed", batch_size=4, retry=policy)
    started = time.monotonic()
    with pytest.raises(RetryError, match=r"deadline=0.5s") as caught:
        for _ in ds:
            pass
    # No attempt starts past the deadline; the last one may take a moment to fail.
    assert caught.value.elapsed < 0.5 + 2.0
    assert 0.3 < time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"dataset": "nope"}, "NOT_FOUND"),
        ({"dataset": "dict", "batch_size": 10**6}, "INVALID_ARGUMENT"),
        # streams > 1 asks CountBatches first, under the same policy
        ({"dataset": "nope", "streams": 2}, "NOT_FOUND"),
        ({"dataset": "dict", "batch_size": 10**6, "streams": 2}, "INVALID_ARGUMENT"),
    ],
)
def test_non_retryable_errors_are_raised_at_once(core_server: ServerProcess, kwargs, code):
    slow_policy = RetryPolicy(attempts=5, initial_backoff=5.0, max_backoff=5.0)
    ds = RemoteDataset(core_server.target, **{"batch_size": 4, **kwargs}, retry=slow_policy)
    started = time.monotonic()
    with pytest.raises(ServerError) as caught:
        for _ in ds:
            pass
    assert caught.value.code.name == code
    assert time.monotonic() - started < 4  # no 5 s backoff was waited


@pytest.mark.parametrize("streams", [1, 2])
def test_a_restart_between_epochs_does_not_end_training(
    killable_server: ServerProcess, streams: int, caplog: pytest.LogCaptureFixture
):
    # The next epoch starts while the server is down for longer than `timeout`: its
    # CountBatches (len(), streams > 1) and its stream both wait out the outage under
    # the retry policy, as a stream does, instead of failing at the call's timeout.
    reference = RemoteDataset(killable_server.target, "slow", batch_size=2, shuffle=True, seed=3)
    reference.set_epoch(1)
    expected = [i for batch in reference for i in batch["index"].tolist()]
    ds = RemoteDataset(
        killable_server.target,
        "slow",
        batch_size=2,
        shuffle=True,
        seed=3,
        streams=streams,
        retry=FAST_RETRY,
        timeout=1.0,
    )
    assert sum(1 for _ in ds) == 120  # epoch 0 (not list(ds): it would ask len() of epoch 1)
    killable_server.stop()
    restart = threading.Thread(
        target=lambda: (time.sleep(2.5), killable_server.start()), daemon=True
    )
    restart.start()
    with caplog.at_level(logging.WARNING, logger="batchwire.client"):
        assert len(ds) == 120  # epoch 1, counted while the server is down
        received = [i for batch in ds for i in batch["index"].tolist()]
    restart.join(timeout=60)
    assert received == expected
    assert any("counting the batches" in record.getMessage() for record in caplog.records)
