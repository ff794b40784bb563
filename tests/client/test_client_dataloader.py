"""RemoteDataset inside DataLoader workers: each pass a new epoch; StatefulDataLoader resumes."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from _serverproc import ServerProcess
from torch.utils.data import DataLoader

from batchwire.client import DevicePrefetcher, RemoteDataset

SETTINGS = {"batch_size": 4, "shuffle": True, "seed": 11}


def indices(batches) -> list[list[int]]:
    return [batch["index"].tolist() for batch in batches]


def epoch_batches(target: str, epoch: int) -> list[list[int]]:
    ds = RemoteDataset(target, "dict", **SETTINGS)
    ds.set_epoch(epoch)
    return indices(ds)


def position(ds: RemoteDataset) -> tuple[int, int]:
    state = ds.state_dict()
    return state["epoch"], state["batch"]


@pytest.mark.parametrize("persistent", [False, True])
def test_each_dataloader_pass_is_a_new_epoch(core_server: ServerProcess, persistent: bool):
    target = core_server.target
    ds = RemoteDataset(target, "dict", **SETTINGS)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent)
    assert indices(loader) == epoch_batches(target, 0)
    assert ds.epoch == 1 and position(ds) == (1, 0)
    assert indices(loader) == epoch_batches(target, 1)  # no set_epoch: the next epoch
    assert ds.epoch == 2 and position(ds) == (2, 0)
    ds.set_epoch(5)  # reaches the workers, persistent ones included
    assert indices(loader) == epoch_batches(target, 5)
    assert position(ds) == (6, 0)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_state_loaded_before_the_loader_resumes_mid_epoch(
    core_server: ServerProcess, persistent: bool
):
    target = core_server.target
    ds = RemoteDataset(target, "dict", **SETTINGS)
    ds.load_state_dict({**ds.state_dict(), "epoch": 3, "batch": 5})
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent)
    assert indices(loader) == epoch_batches(target, 3)[5:]
    assert indices(loader) == epoch_batches(target, 4)


torchdata = pytest.importorskip("torchdata.stateful_dataloader")


def run_until_killed(target: str, workers: int, kill_after: int) -> tuple[list, dict]:
    """Passes of a StatefulDataLoader, checkpointed at every batch, killed after some."""
    ds = RemoteDataset(target, "dict", **SETTINGS)
    loader = torchdata.StatefulDataLoader(ds, batch_size=None, num_workers=workers)
    trained: list[list[int]] = []
    for _ in range(2):
        for batch in loader:
            trained.append(batch["index"].tolist())
            state = pickle.loads(pickle.dumps(loader.state_dict()))  # as a checkpoint keeps it
            if len(trained) == kill_after:
                return trained, state
    raise AssertionError(f"two passes ended before batch {kill_after}")


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_stateful_dataloader_resumes_exactly(core_server: ServerProcess, workers: int):
    target = core_server.target
    expected = epoch_batches(target, 0) + epoch_batches(target, 1)
    assert len(expected) == 52
    for kill_after in (7, 26, 33):
        first, state = run_until_killed(target, workers, kill_after)
        assert first == expected[:kill_after]
        ds = RemoteDataset(target, "dict", **SETTINGS)
        loader = torchdata.StatefulDataLoader(ds, batch_size=None, num_workers=workers)
        loader.load_state_dict(state)
        rest = indices(loader)  # the rest of the pass the checkpoint was taken in
        if kill_after <= 26:
            rest += indices(loader)  # ... and the next pass: the next epoch
        assert first + rest == expected, f"{workers} workers, killed after {kill_after}"


def test_spawned_workers_share_the_pass_record(core_server: ServerProcess):
    target = core_server.target
    ds = RemoteDataset(target, "dict", **SETTINGS)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert indices(loader) == epoch_batches(target, 0)
    assert indices(loader) == epoch_batches(target, 1)
    assert position(ds) == (2, 0)


UNSHARED_SCRIPT = """
import pickle, sys
from torch.utils.data import DataLoader
from batchwire.client import DevicePrefetcher, RemoteDataset
ds = RemoteDataset(sys.argv[1], "dict", batch_size=4)
ds._ledger = pickle.loads(pickle.dumps(ds._ledger))  # a plain copy: not in shared memory
assert not ds._ledger.shared
print(sum(1 for _ in DataLoader(ds, batch_size=None, num_workers=2)))
"""


def test_workers_that_cannot_share_the_record_say_so(core_server: ServerProcess):
    result = subprocess.run(
        [sys.executable, "-c", UNSHARED_SCRIPT, core_server.target],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "26"
    assert "may repeat an epoch" in result.stderr


def test_a_prefetcher_over_a_stateful_dataloader_checkpoints_the_loop(core_server: ServerProcess):
    target = core_server.target
    expected = epoch_batches(target, 0)

    def prefetched() -> DevicePrefetcher:
        ds = RemoteDataset(target, "dict", **SETTINGS)
        loader = torchdata.StatefulDataLoader(ds, batch_size=None, num_workers=2)
        return DevicePrefetcher(loader, "cpu", depth=3)

    trained, batches = [], prefetched()
    for batch in batches:
        trained.append(batch["index"].tolist())
        state = pickle.loads(pickle.dumps(batches.state_dict()))
        if len(trained) == 9:
            break
    resumed = prefetched()
    resumed.load_state_dict(state)
    assert trained + indices(resumed) == expected


def test_a_state_at_an_epochs_end_continues_with_the_next_epoch_in_workers(
    core_server: ServerProcess,
):
    target = core_server.target
    ds = RemoteDataset(target, "dict", **SETTINGS)
    ds.load_state_dict({**ds.state_dict(), "epoch": 2, "batch": 26})  # epoch 2's end, raw
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert indices(loader) == epoch_batches(target, 3)
    assert position(ds) == (4, 0) and ds.epoch == 4
