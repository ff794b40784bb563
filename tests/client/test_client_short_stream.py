"""A stream that ends OK but short (mid-batch, or before its share's end) is resumed.

A correct server never does this, so the cut is made by a pass-through relay
(tests/client/relay.py) in front of the real server, as a proxy might.
"""

from __future__ import annotations

import logging

import pytest
from _serverproc import ServerProcess
from client_support import FAST_RETRY, RESUME_CONFIG
from conftest import assert_same_batch
from relay import Relay

from batchwire.client import RemoteDataset, RetryError, RetryPolicy


@pytest.fixture(scope="module")
def resume_server(tmp_path_factory: pytest.TempPathFactory):
    config = tmp_path_factory.mktemp("short") / "resume.toml"
    config.write_text(RESUME_CONFIG)
    with ServerProcess(config) as server:
        yield server


def broke_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "stream broke" in r.getMessage()]


@pytest.mark.parametrize("streams", [1, 3])
def test_a_stream_that_ends_before_its_share_is_resumed(
    resume_server: ServerProcess, streams: int, caplog: pytest.LogCaptureFixture
):
    # "indexed": 103 samples, 26 batches of 4, one frame each.
    expected = [
        b["index"].tolist() for b in RemoteDataset(resume_server.target, "indexed", batch_size=4)
    ]
    with Relay(resume_server.target) as relay, caplog.at_level(logging.WARNING, "batchwire.client"):
        relay.break_stream(after_frames=5, how="end")
        ds = RemoteDataset(relay.target, "indexed", batch_size=4, streams=streams, retry=FAST_RETRY)
        received = [b["index"].tolist() for b in ds]
        assert relay.cut_streams == 1
    assert received == expected
    assert any("ended without an error before batch" in m for m in broke_messages(caplog))


def test_a_stream_that_ends_in_the_middle_of_a_batch_is_resumed(
    core_server: ServerProcess, caplog: pytest.LogCaptureFixture
):
    # "big": 4 MiB samples sent in 1 MiB chunks, so a batch spans several frames.
    expected = list(RemoteDataset(core_server.target, "big", batch_size=2))
    with Relay(core_server.target) as relay, caplog.at_level(logging.WARNING, "batchwire.client"):
        relay.break_stream(after_frames=11, how="end")  # inside batch 1
        ds = RemoteDataset(relay.target, "big", batch_size=2, retry=FAST_RETRY)
        received = list(ds)
        assert relay.cut_streams == 1
    assert len(received) == len(expected) == 12
    for i, (got, want) in enumerate(zip(received, expected, strict=True)):
        assert_same_batch(got, want, f"batch {i}")
    assert any("in the middle of a batch" in m for m in broke_messages(caplog))


def test_a_short_stream_is_an_error_when_reconnecting_is_off(resume_server: ServerProcess):
    with Relay(resume_server.target) as relay:
        relay.break_stream(after_frames=5, how="end")
        ds = RemoteDataset(relay.target, "indexed", batch_size=4, retry=RetryPolicy(attempts=0))
        with pytest.raises(RetryError) as caught:
            for _ in ds:
                pass
    assert caught.value.last_error.code.name == "DATA_LOSS"
    assert "ended without an error before batch 5, but the epoch has 26 batches" in str(
        caught.value
    )
    assert ds.state_dict()["batch"] == 5  # iterating again resumes at the owed batch
