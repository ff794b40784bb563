"""Built-in sources: synthetic determinism, arrays memory-mapped from .npy and .npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _serverproc import ServerProcess

from batchwire.client import RemoteDataset
from batchwire.server.config import ConfigError, DatasetConfig
from batchwire.server.sources import build_dataset


def build(tmp_path, source, **options):
    return build_dataset(DatasetConfig("d", source, options), tmp_path / "c.toml")


def test_synthetic_is_deterministic_and_typed(tmp_path):
    options = dict(
        length=5,
        seed=3,
        fields={
            "x": {"shape": [2, 3], "dtype": "bfloat16"},
            "y": {"shape": [], "dtype": "int64", "low": 5, "high": 9},
        },
    )
    a, b = build(tmp_path, "synthetic", **options), build(tmp_path, "synthetic", **options)
    assert len(a) == 5
    assert torch.equal(a[4]["x"], b[4]["x"]) and a[4]["x"].dtype == torch.bfloat16
    assert not torch.equal(a[3]["x"], a[4]["x"])
    labels = torch.stack([a[i]["y"] for i in range(5)])
    assert labels.dtype == torch.int64 and bool(((labels >= 5) & (labels < 9)).all())
    with pytest.raises(IndexError):
        a[5]


def test_arrays_from_npy_files_are_memory_mapped(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    y = np.arange(20, dtype=np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    dataset = build(tmp_path, "arrays", files={"x": "x.npy", "y": "y.npy"}, item="tuple")
    assert isinstance(dataset.arrays["x"], np.memmap)
    features, label = dataset[7]
    assert features.tolist() == x[7].tolist() and int(label) == 7
    features += 1  # samples are writable copies; the file is untouched
    assert dataset[7][0].tolist() == x[7].tolist()


@pytest.mark.parametrize("compressed", [False, True])
def test_arrays_from_npz(tmp_path, compressed):
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "d.npz", image=np.random.rand(10, 2, 2).astype(np.float32), label=np.arange(10))
    dataset = build(tmp_path, "arrays", path="d.npz")
    assert isinstance(dataset.arrays["image"], np.memmap) is not compressed
    with np.load(tmp_path / "d.npz") as reference:
        assert np.array_equal(dataset[3]["image"].numpy(), reference["image"][3])
    with pytest.raises(ConfigError, match="has no array 'nope'"):
        build(tmp_path, "arrays", path="d.npz", fields=["nope"])


def test_arrays_served_end_to_end(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(30, dtype=np.uint8).reshape(10, 3))
    np.save(tmp_path / "y.npy", np.arange(10, dtype=np.int32))
    config = tmp_path / "arrays.toml"
    config.write_text('[datasets.a]\nsource = "arrays"\nfiles = { x = "x.npy", y = "y.npy" }\n')
    with ServerProcess(config, workers=1) as server:
        batches = list(RemoteDataset(server.target, "a", batch_size=4))
    assert [b["y"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0]["x"].dtype == torch.uint8 and batches[0]["y"].dtype == torch.int32


def _assert_same_batch(got, want):
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        got, want = list(got.values()), list(want.values())
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        a.add_(1) if a.dtype is not torch.bool else a.logical_not_()  # owns writable memory


@pytest.mark.parametrize("item", ["dict", "tuple"])
def test_synthetic_load_batch_equals_default_collate(tmp_path, item):
    fields = {
        "x": {"shape": [3, 5], "dtype": "float32"},
        "h": {"shape": [4], "dtype": "bfloat16"},
        "m": {"shape": [2], "dtype": "bool"},
        "e": {"shape": [0, 2], "dtype": "float16"},
        "y": {"shape": [], "dtype": "int64", "low": 2, "high": 7},
        "u": {"shape": [2, 2], "dtype": "uint8"},
    }
    dataset = build(tmp_path, "synthetic", length=100, seed=9, fields=fields, item=item)
    indices = [5, 99, 0, 5, 42]
    want = torch.utils.data.default_collate([dataset[i] for i in indices])
    _assert_same_batch(dataset.load_batch(indices), want)
    with pytest.raises(IndexError):
        dataset.load_batch([1, 100])
    with pytest.raises(IndexError):
        dataset.load_batch([-1])


def test_synthetic_samples_differ_and_cover_the_range(tmp_path):
    fields = {"y": {"shape": [], "dtype": "int64", "low": 0, "high": 10}, "x": {"shape": [8]}}
    dataset = build(tmp_path, "synthetic", length=5000, seed=1, fields=fields)
    batch = dataset.load_batch(range(5000))
    assert set(batch["y"].tolist()) == set(range(10))
    distinct = {tuple(row) for row in batch["x"].tolist()}
    assert len(distinct) == 5000  # windows at distinct offsets for any SPAN consecutive items
    other = build(tmp_path, "synthetic", length=5000, seed=2, fields=fields)
    assert not torch.equal(other.load_batch(range(50))["x"], batch["x"][:50])


@pytest.mark.parametrize("item", ["dict", "tuple"])
def test_arrays_load_batch_equals_default_collate(tmp_path, item):
    np.save(tmp_path / "x.npy", np.arange(60, dtype=np.float32).reshape(20, 3))
    np.save(tmp_path / "y.npy", np.arange(20, dtype=np.int64))
    dataset = build(tmp_path, "arrays", files={"x": "x.npy", "y": "y.npy"}, item=item)
    indices = [7, 0, 19, 7]
    want = torch.utils.data.default_collate([dataset[i] for i in indices])
    _assert_same_batch(dataset.load_batch(indices), want)
    with pytest.raises(IndexError):
        dataset.load_batch([20])


def test_synthetic_rejects_a_negative_seed_and_ranges_outside_the_dtype(tmp_path):
    with pytest.raises(ConfigError, match="seed"):
        build(tmp_path, "synthetic", length=4, seed=-1, fields={"x": {"shape": [2]}})
    with pytest.raises(ConfigError, match="does not fit int8"):
        build(
            tmp_path,
            "synthetic",
            length=4,
            fields={"x": {"shape": [2], "dtype": "int8", "high": 300}},
        )
    small = build(tmp_path, "synthetic", length=64, fields={"x": {"shape": [8], "dtype": "int8"}})
    values = small.load_batch(range(64))["x"]  # default range [0, 128) fits int8
    assert values.dtype == torch.int8 and int(values.min()) >= 0
