"""Positions in samples for the default order (issue 12, 1 and 4): the batch size changes, no sample
is lost or repeated; with streams, DataLoader workers, checkpoints of either form."""

from __future__ import annotations

import pytest
from _serverproc import ServerProcess
from torch.utils.data import DataLoader, DistributedSampler

from batchwire.client import DevicePrefetcher, RemoteDataset

LENGTH = 103  # the core config's "dict" dataset
SETTINGS = {"shuffle": True, "seed": 7, "rank": 1, "world_size": 2}


def rank_order(epoch: int) -> list[int]:
    """Rank 1 of 2's samples: DistributedSampler's, whatever the batch size."""
    sampler = DistributedSampler(range(LENGTH), num_replicas=2, rank=1, shuffle=True, seed=7)
    sampler.set_epoch(epoch)
    return list(sampler)


def cut(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize("streams", [1, 3])
def test_set_batch_size_mid_pass_continues_at_the_next_sample(
    core_server: ServerProcess, streams: int
):
    ds = RemoteDataset(core_server.target, "dict", batch_size=4, streams=streams, **SETTINGS)
    ds.set_epoch(2)
    assert len(ds) == 13  # 52 samples of this rank
    got, lengths = [], []
    for number, batch in enumerate(ds, 1):
        got.append(batch["index"].tolist())
        if number == 3:
            ds.set_batch_size(10)  # the very next batch has 10 samples
            lengths.append(len(ds))  # the batches left: 40 samples in 10s
        if number == 5:
            ds.set_batch_size(3)
            lengths.append(len(ds))  # 20 left in 3s
    order = rank_order(2)
    assert got == cut(order[:12], 4) + cut(order[12:32], 10) + cut(order[32:], 3)
    assert lengths == [4, 7]
    assert ds.state_dict()["epoch"] == 3 and len(ds) == 18  # the next epoch, at 3 per batch


def test_a_checkpoint_at_32_resumes_at_64_whatever_its_form(core_server: ServerProcess):
    order = rank_order(0)
    ds = RemoteDataset(core_server.target, "dict", batch_size=8, **SETTINGS)
    for number, _ in enumerate(ds, 1):
        if number == 3:
            state = ds.state_dict()
            break
    assert (state["epoch"], state["sample"], state["batch"]) == (0, 0, 3)
    legacy = {key: state[key] for key in ("epoch", "batch", "config")}  # before samples counted
    for saved in (state, legacy):
        resumed = RemoteDataset(core_server.target, "dict", batch_size=16, **SETTINGS)
        resumed.load_state_dict(saved)
        assert resumed.state_dict()["sample"] == 24 and len(resumed) == 2  # 28 left: 16 + 12
        assert [b["index"].tolist() for b in resumed] == cut(order[24:], 16)
    # Another rank or world size still changes the order: refused, naming it.
    other = RemoteDataset(core_server.target, "dict", batch_size=16, **{**SETTINGS, "rank": 0})
    with pytest.raises(ValueError, match=r"rank=1 \(this dataset: 0\)"):
        other.load_state_dict(state)


def test_the_prefetcher_drops_its_read_ahead(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", batch_size=4, **SETTINGS)
    batches = DevicePrefetcher(ds, "cpu", depth=3)
    got = []
    for number, batch in enumerate(batches, 1):
        got.append(batch["index"].tolist())
        if number == 2:
            batches.set_batch_size(20)
            assert batches.state_dict()["batch"] == 2  # the batch the loop holds
    order = rank_order(0)
    assert got == cut(order[:8], 4) + cut(order[8:], 20)


@pytest.mark.parametrize("persistent", [False, True])
def test_dataloader_workers_take_the_new_batch_size_at_their_next_pass(
    core_server: ServerProcess, persistent: bool
):
    ds = RemoteDataset(core_server.target, "dict", batch_size=4, **SETTINGS)
    ds.load_state_dict({**ds.state_dict(), "epoch": 3, "batch": 5})
    ds.set_batch_size(6)  # from sample 20 of epoch 3
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent)
    assert [b["index"].tolist() for b in loader] == cut(rank_order(3)[20:], 6)
    ds.set_batch_size(9)
    assert [b["index"].tolist() for b in loader] == cut(rank_order(4), 9)


def test_a_new_batch_size_after_a_resumed_pass_starts_the_next_epoch(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", batch_size=4, **SETTINGS)
    ds.load_state_dict({**ds.state_dict(), "epoch": 3, "batch": 12})  # the last of 13 batches
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert [b["index"].tolist() for b in loader] == cut(rank_order(3)[48:], 4)
    ds.set_batch_size(9)  # the resumed position, 12 batches of 4, is 48 samples: 6 at 9
    assert ds.epoch == 4
    assert [b["index"].tolist() for b in loader] == cut(rank_order(4), 9)


def test_dynamic_batches_change_size_only_between_epochs(core_server: ServerProcess):
    ds = RemoteDataset(core_server.target, "dict", batch_size=4, sampler="dynamic")
    for number, _ in enumerate(ds, 1):
        if number == 2:
            with pytest.raises(ValueError, match="'dynamic' sampler packs batches"):
                ds.set_batch_size(8)
            break
    state = RemoteDataset(core_server.target, "dict", batch_size=4, sampler="dynamic")
    other = RemoteDataset(core_server.target, "dict", batch_size=8, sampler="dynamic")
    with pytest.raises(ValueError, match=r"batch_size=4 \(this dataset: 8\)"):
        other.load_state_dict({**state.state_dict(), "batch": 2})
