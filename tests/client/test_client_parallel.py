"""Disjoint shares of one epoch: parallel streams in one client and DataLoader workers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serverproc import ServerProcess
from torch.utils.data import DataLoader

from batchwire.client import RemoteDataset, ServerError

PIPELINE_TESTS = Path(__file__).resolve().parents[1] / "pipeline"  # pipeline_data.py


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


def stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("batchwire-stream")]


def test_stopping_early_releases_the_stream_threads(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", batch_size=1, streams=4, buffer=1)
    batches = iter(ds)
    next(batches)
    batches.close()  # as a `break` out of the loop does
    # Gone when close() returns, not soon after: a DataLoader that forks its workers
    # next must not copy a process with threads inside grpc (the child can crash).
    assert stream_threads() == []
    assert ds.epoch == 1  # the abandoned pass counts as an epoch, as with a DataLoader


def test_bad_parallel_settings_are_refused(core_server: ServerProcess):
    with pytest.raises(ValueError, match="streams should be a positive integer, but got streams=0"):
        RemoteDataset(core_server.target, "dict", batch_size=4, streams=0)
    with pytest.raises(ValueError, match="buffer=-1"):
        RemoteDataset(core_server.target, "dict", batch_size=4, buffer=-1)


# -- a sampler whose batch count only the server knows ---------------------------------

DYNAMIC_CONFIG = f"""
[server]
python_path = ["{PIPELINE_TESTS}"]

[datasets.seqs]
source = "python"
factory = "pipeline_data:variable_sequences"
kwargs = {{ length = 97 }}
collate = {{ kind = "pad", fields = ["tokens"], padding_value = -1 }}
sampler = {{ kind = "dynamic", length_field = "tokens", max_tokens = 40 }}
"""


@pytest.fixture(scope="module")
def dynamic_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("dynamic") / "dynamic.toml"
    path.write_text(DYNAMIC_CONFIG)
    with ServerProcess(path, workers=2) as server:
        yield server


def labels(batches) -> list[list[int]]:
    return [batch["label"].tolist() for batch in batches]


def test_shares_of_dynamic_batches_follow_the_servers_plan(dynamic_server: ServerProcess):
    def dataset(**kwargs) -> RemoteDataset:
        return RemoteDataset(
            dynamic_server.target, "seqs", batch_size=1, shuffle=True, seed=2, **kwargs
        )

    expected = labels(dataset())
    assert sorted(i for batch in expected for i in batch) == list(range(97))
    assert len(dataset()) == len(expected)  # the server's count, not length / batch_size
    assert labels(dataset(streams=3)) == expected
    assert labels(DataLoader(dataset(), batch_size=None, num_workers=3)) == expected
    resumed = dataset(streams=2)
    resumed.load_state_dict({**resumed.state_dict(), "batch": len(expected) - 1})
    assert labels(resumed) == expected[-1:]
    at_end = dataset()
    at_end.load_state_dict({**at_end.state_dict(), "batch": len(expected)})
    next_epoch = dataset()
    next_epoch.set_epoch(1)
    assert labels(at_end) == labels(next_epoch)
