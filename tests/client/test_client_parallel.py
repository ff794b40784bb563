"""Disjoint shares of one epoch: parallel streams in one client and DataLoader workers."""

from __future__ import annotations

import threading
import time

import pytest
from _serverproc import ServerProcess
from torch.utils.data import DataLoader

from batchwire.client import RemoteDataset, ServerError


def indices(batches) -> list[list[int]]:
    return [batch["index"].tolist() for batch in batches]


def reference(target: str, epoch: int = 0, **kwargs) -> list[list[int]]:
    ds = RemoteDataset(target, "dict", batch_size=4, shuffle=True, seed=5, **kwargs)
    ds.set_epoch(epoch)
    return indices(ds)


@pytest.mark.parametrize("streams", [2, 3, 4, 30])
def test_parallel_streams_yield_the_epoch_in_order(core_server: ServerProcess, streams):
    expected = reference(core_server.target)
    ds = RemoteDataset(
        core_server.target, "dict", batch_size=4, shuffle=True, seed=5, streams=streams
    )
    assert indices(ds) == expected
    assert indices(ds) == reference(core_server.target, epoch=1)  # the next pass: next epoch


def test_dataloader_workers_cover_the_epoch_exactly_once(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", batch_size=4, shuffle=True, seed=5)
    expected = reference(core_server.target)
    loader = DataLoader(ds, batch_size=None, num_workers=3)
    got = indices(loader)
    assert len(loader) == len(expected) == 26
    assert got == expected  # each worker streamed a disjoint share; the loader interleaves them
    assert sorted(i for batch in got for i in batch) == list(range(103))


def test_dataloader_workers_with_parallel_streams_and_set_epoch(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", batch_size=4, shuffle=True, seed=5, streams=2)
    loader = DataLoader(ds, batch_size=None, num_workers=3)
    for epoch in (0, 1):
        ds.set_epoch(
            epoch
        )  # workers copy the dataset each epoch: pin the epoch, as with DistributedSampler
        assert indices(loader) == reference(core_server.target, epoch=epoch)


def test_persistent_dataloader_workers_advance_the_epoch(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", batch_size=4, shuffle=True, seed=5)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    assert indices(loader) == reference(core_server.target, epoch=0)
    assert indices(loader) == reference(core_server.target, epoch=1)


def test_a_failing_stream_fails_the_pass_and_says_which(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "failing", batch_size=2, streams=4)
    with pytest.raises(ServerError) as caught:
        for _ in ds:
            pass
    assert caught.value.code.name == "INTERNAL"
    assert "13" in caught.value.details  # the sample index that raised
    assert any("stream" in note and "of 4" in note for note in caught.value.__notes__)


def test_stopping_early_releases_the_stream_threads(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", batch_size=1, streams=4, buffer=1)
    batches = iter(ds)
    next(batches)
    batches.close()  # as a `break` out of the loop does
    deadline = time.monotonic() + 10
    while any(t.name.startswith("batchwire-stream") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "stream threads still running after the consumer left"
        time.sleep(0.05)
    assert ds.epoch == 1  # the abandoned pass counts as an epoch, as with a DataLoader


def test_bad_parallel_settings_are_refused(core_server: ServerProcess):
    with pytest.raises(ValueError, match="streams should be a positive integer, but got streams=0"):
        RemoteDataset(core_server.target, "dict", batch_size=4, streams=0)
    with pytest.raises(ValueError, match="buffer=-1"):
        RemoteDataset(core_server.target, "dict", batch_size=4, buffer=-1)
