"""The stream equals a local DataLoader + DistributedSampler, tensor for tensor (real server)."""

from __future__ import annotations

import itertools

import pytest
import sample_datasets
from conftest import assert_same_batch
from torch.utils.data import DataLoader, DistributedSampler

from batchwire.client import RemoteDataset
from batchwire.server.config import DatasetConfig
from batchwire.server.sources import build_dataset


def local_batches(dataset, *, batch_size, shuffle, seed, epoch, rank, world_size, drop_last):
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last))


GRID = list(itertools.product([1, 3], [False, True], [False, True], [0, 1]))


@pytest.mark.parametrize(("world_size", "shuffle", "drop_last", "epoch"), GRID)
def test_dict_items_match(core_server, world_size, shuffle, drop_last, epoch):
    local_dataset = sample_datasets.indexed_dict(103)  # 103: not a multiple of 3 or of 8
    for rank in range(world_size):
        remote = RemoteDataset(
            core_server.target,
            "dict",
            batch_size=8,
            shuffle=shuffle,
            seed=42,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        remote.set_epoch(epoch)
        expected = local_batches(
            local_dataset,
            batch_size=8,
            shuffle=shuffle,
            seed=42,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        actual = list(remote)
        assert len(actual) == len(expected) == len(remote)
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_batch(a, e, f"rank {rank} batch {i}")


def test_tuple_items_keep_structure_and_dtypes(core_server):
    remote = RemoteDataset(core_server.target, "tuple", batch_size=16, shuffle=True, seed=3)
    expected = local_batches(
        sample_datasets.indexed_tuple(50),
        batch_size=16,
        shuffle=True,
        seed=3,
        epoch=0,
        rank=0,
        world_size=1,
        drop_last=False,
    )
    actual = list(remote)
    assert len(actual) == 4  # 50 = 3 * 16 + 2
    for a, e in zip(actual, expected, strict=True):
        assert_same_batch(a, e)
    features, label, extras = actual[0]
    assert features.dtype.is_floating_point and features.dtype.itemsize == 8
    assert label.dtype.itemsize == 8 and extras["id"].shape == (16, 2)


def test_uint8_float32_int64_fields_arrive_with_their_dtypes(core_server):
    batch = next(iter(RemoteDataset(core_server.target, "dict", batch_size=4)))
    assert {k: str(v.dtype) for k, v in batch.items()} == {
        "index": "torch.int64",
        "features": "torch.float32",
        "pixels": "torch.uint8",
    }


def test_start_position_mid_epoch(core_server):
    remote = RemoteDataset(
        core_server.target, "dict", batch_size=8, shuffle=True, seed=1, rank=1, world_size=3
    )
    expected = local_batches(
        sample_datasets.indexed_dict(103),
        batch_size=8,
        shuffle=True,
        seed=1,
        epoch=2,
        rank=1,
        world_size=3,
        drop_last=False,
    )
    tail = [batch for _, batch in remote._client.batches(remote.request(epoch=2, start_batch=3))]
    assert len(tail) == len(expected) - 3
    for a, e in zip(tail, expected[3:], strict=True):
        assert_same_batch(a, e)


def test_each_pass_is_a_new_epoch_unless_pinned(core_server):
    remote = RemoteDataset(core_server.target, "dict", batch_size=103, shuffle=True, seed=0)
    first, second = next(iter(remote)), next(iter(remote))
    assert not first["index"].equal(second["index"]), "two passes gave the same order"
    remote.set_epoch(0)
    assert next(iter(remote))["index"].equal(first["index"])


def test_batch_above_chunk_size_is_reassembled(core_server, core_config):
    # 10 x 1024 x 1024 float32 = 40 MiB per batch, sent in 1 MiB chunks.
    remote = RemoteDataset(core_server.target, "big", batch_size=10, shuffle=True, seed=5)
    from batchwire.server.config import load_config

    config = load_config(core_config)
    local = build_dataset(config.datasets["big"], config.file)
    expected = local_batches(
        local, batch_size=10, shuffle=True, seed=5, epoch=0, rank=0, world_size=1, drop_last=False
    )
    actual = list(remote)
    assert actual[0]["image"].nbytes == 40 * 1024 * 1024
    for a, e in zip(actual, expected, strict=True):
        assert_same_batch(a, e)


def test_dataset_config_is_plain_data():
    # Workers rebuild datasets from the config: it must pickle.
    import pickle

    config = DatasetConfig("x", "synthetic", {"length": 3})
    assert pickle.loads(pickle.dumps(config)) == config
