"""state_dict()/load_state_dict(): a restarted trainer continues mid-epoch, exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _serverproc import ServerProcess
from torch.utils.data import DataLoader

from batchwire.client import RemoteDataset

SETTINGS = {"batch_size": 4, "shuffle": True, "seed": 11, "rank": 1, "world_size": 2}

# A trainer's process restarted from a checkpoint: a fresh interpreter builds the
# dataset, loads the saved state and prints the sample indices it then receives.
RESUMED_TRAINER = """
import json, sys
from batchwire.client import RemoteDataset
target, settings, state = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ds = RemoteDataset(target, "dict", **settings)
ds.load_state_dict(state)
print(json.dumps({"epoch": ds.epoch, "batches": [b["index"].tolist() for b in ds]}))
"""


def indices(batches) -> list[list[int]]:
    return [batch["index"].tolist() for batch in batches]


def epoch_batches(target: str, epoch: int, **overrides) -> list[list[int]]:
    ds = RemoteDataset(target, "dict", **{**SETTINGS, **overrides})
    ds.set_epoch(epoch)
    return indices(ds)


def resume_in_new_process(target: str, state: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", RESUMED_TRAINER, target, json.dumps(SETTINGS), json.dumps(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("stop_after", [1, 5])
def test_state_dict_mid_epoch_resumes_in_a_new_process(core_server: ServerProcess, stop_after):
    expected = epoch_batches(core_server.target, epoch=2)
    ds = RemoteDataset(core_server.target, "dict", **SETTINGS)
    ds.set_epoch(2)
    seen = []
    for batch in ds:
        seen.append(batch["index"].tolist())
        if len(seen) == stop_after:
            state = json.loads(json.dumps(ds.state_dict()))  # as a checkpoint stores it
            break
    assert state["epoch"] == 2 and state["batch"] == stop_after
    resumed = resume_in_new_process(core_server.target, state)
    assert resumed["epoch"] == 2
    assert seen + resumed["batches"] == expected
    assert resumed["batches"] == expected[stop_after:]


def test_state_saved_at_the_epoch_end_starts_the_next_epoch(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", **SETTINGS)
    total = len(ds)
    for count, _ in enumerate(ds, start=1):
        if count == total:  # after the last batch, before the loop sees the end
            state = ds.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 0)
    # A state that records the raw end position (its epoch's length unknown when saved)
    # rolls over too: the next pass is epoch 1, not an empty epoch 0.
    raw = {**state, "epoch": 0, "batch": total}
    fresh = RemoteDataset(core_server.target, "dict", **SETTINGS)
    fresh.load_state_dict(raw)
    assert indices(fresh) == epoch_batches(core_server.target, epoch=1)
    assert fresh.epoch == 2


def test_resumed_position_survives_set_epoch_of_the_same_epoch(core_server: ServerProcess):
    expected = epoch_batches(core_server.target, epoch=3)
    ds = RemoteDataset(core_server.target, "dict", **SETTINGS)
    ds.load_state_dict({**ds.state_dict(), "epoch": 3, "batch": 4})
    ds.set_epoch(3)  # the usual `for epoch in range(ds.epoch, n): ds.set_epoch(epoch)`
    assert indices(ds) == expected[4:]
    assert ds.state_dict()["epoch"] == 4 and ds.state_dict()["batch"] == 0
    ds.load_state_dict({**ds.state_dict(), "epoch": 3, "batch": 4})
    ds.set_epoch(5)  # another epoch: start it from the beginning
    assert indices(ds) == epoch_batches(core_server.target, epoch=5)


def test_resume_with_parallel_streams_and_dataloader_workers(core_server: ServerProcess):
    expected = epoch_batches(core_server.target, epoch=0)
    ds = RemoteDataset(core_server.target, "dict", **SETTINGS, streams=2)
    ds.load_state_dict({**ds.state_dict(), "batch": 3})
    assert indices(DataLoader(ds, batch_size=None, num_workers=2)) == expected[3:]


def test_state_from_other_settings_is_refused(core_server: ServerProcess):
    state = RemoteDataset(core_server.target, "dict", **SETTINGS).state_dict()
    other = RemoteDataset(core_server.target, "dict", **{**SETTINGS, "seed": 12, "rank": 0})
    with pytest.raises(
        ValueError, match=r"seed=11 \(this dataset: 12\), rank=1 \(this dataset: 0\)"
    ):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="batch=-1"):
        other.load_state_dict({**other.state_dict(), "batch": -1})
