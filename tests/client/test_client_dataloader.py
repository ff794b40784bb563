"""RemoteDataset inside DataLoader workers: each pass a new epoch; StatefulDataLoader resumes."""

from __future__ import annotations

import pickle

import pytest
from _serverproc import ServerProcess
from torch.utils.data import DataLoader

from batchwire.client import RemoteDataset

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


def stateful_run(target: str, workers: int, state: dict | None, kill_after: int | None):
    """Two epochs through a StatefulDataLoader; returns (batches trained, last state)."""
    ds = RemoteDataset(target, "dict", **SETTINGS)
    loader = torchdata.StatefulDataLoader(ds, batch_size=None, num_workers=workers)
    if state is not None:
        loader.load_state_dict(state)
    trained, saved = [], None
    while len(trained) < 2 * 26 - (0 if state is None else state_trained(state)):
        for batch in loader:
            trained.append(batch["index"].tolist())
            saved = pickle.loads(pickle.dumps(loader.state_dict()))  # as a checkpoint keeps it
            if len(trained) == kill_after:
                return trained, saved
    return trained, saved


def state_trained(state: dict) -> int:
    return (
        state["_snapshot"]["_snapshot_step"]
        + state["_steps_since_snapshot"]
        + state.get("_epoch_offset", 0)
    )


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_stateful_dataloader_resumes_exactly(core_server: ServerProcess, workers: int):
    target = core_server.target
    expected = epoch_batches(target, 0) + epoch_batches(target, 1)
    assert len(expected) == 52
    for kill_after in (7, 26, 33):
        first, state = stateful_run(target, workers, None, kill_after)
        assert first == expected[:kill_after]
        ds = RemoteDataset(target, "dict", **SETTINGS)
        loader = torchdata.StatefulDataLoader(ds, batch_size=None, num_workers=workers)
        loader.load_state_dict(state)
        rest = indices(loader)  # the rest of the pass the checkpoint was taken in
        if kill_after < 26:
            rest += indices(loader)  # ... and the next pass: the next epoch
        assert first + rest == expected, f"{workers} workers, killed after {kill_after}"
