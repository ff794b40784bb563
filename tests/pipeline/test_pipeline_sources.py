"""The image_folder and timeseries sources, and arrays memory-mapped inside the workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _serverproc import ServerProcess
from pipeline_data import batches, make_image_folder, worker_pids

from batchwire.client import ServerError
from batchwire.server.config import ConfigError, DatasetConfig
from batchwire.server.pipeline import build_pipeline
from batchwire.server.sources import build_dataset


def build(folder: Path, source: str, **options):
    return build_dataset(DatasetConfig("d", source, options), folder / "c.toml")


# -- image_folder -----------------------------------------------------------------------------


def test_image_folder_lists_sorted_classes_and_files_and_decodes_lazily(tmp_path):
    make_image_folder(tmp_path / "imgs", {"b": 2, "a": 3}, ext=".png")
    (tmp_path / "imgs" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "b" / "zz_broken.png").write_bytes(b"not a png")
    dataset = build(tmp_path, "image_folder", root="imgs")  # the broken file is not read yet
    assert dataset.classes == ("a", "b")
    assert len(dataset) == 6 and dataset.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert [Path(dataset.path(i)).name for i in (0, 3, 5)] == [
        "000.png",
        "000.png",
        "zz_broken.png",
    ]
    image, label = dataset[4]
    assert image.mode == "RGB" and image.size == (24, 20) and label == 1
    gray = build(tmp_path, "image_folder", root="imgs", mode="L")
    assert gray[0][0].mode == "L"
    with pytest.raises(Exception, match="cannot identify image file"):
        dataset[5]


@pytest.mark.parametrize(
    ("options", "key", "reason"),
    [
        ({"root": "missing"}, "datasets.d.root", "folder not found"),
        ({"root": "empty"}, "datasets.d.root", "no class folders"),
        ({"root": "imgs", "extensions": ["jpg"]}, "datasets.d.extensions", "expected an array"),
        ({"root": "imgs", "extensions": [".gif"]}, "datasets.d.root", "no images with extensions"),
        ({"root": "imgs", "mode": "CMYK"}, "datasets.d.mode", "unknown value 'CMYK'"),
    ],
)
def test_image_folder_config_errors(tmp_path, options, key, reason):
    make_image_folder(tmp_path / "imgs", {"a": 1})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        build(tmp_path, "image_folder", **options)
    assert info.value.key == key and reason in info.value.reason


# -- timeseries -------------------------------------------------------------------------------


def windows(array: np.ndarray, length: int, horizon: int, stride: int, squeeze: bool):
    starts = range(0, len(array) - length - horizon + 1, stride)
    sequences = [array[s : s + length] for s in starts]
    targets = [array[s + length : s + length + horizon] for s in starts]
    if squeeze and horizon == 1:
        targets = [t[0] for t in targets]
    return np.stack(sequences), np.stack(targets)


def test_timeseries_windows_one_and_two_dimensional(tmp_path):
    series = np.arange(50, dtype=np.float32) ** 1.5
    np.save(tmp_path / "s.npy", series)
    dataset = build(tmp_path, "timeseries", path="s.npy", length=8, horizon=2, stride=3)
    sequences, targets = windows(series, 8, 2, 3, True)
    assert len(dataset) == len(sequences) == 14
    for i in (0, 7, 13):
        assert np.array_equal(dataset[i][0].numpy(), sequences[i])
        assert np.array_equal(dataset[i][1].numpy(), targets[i])
    table = np.random.default_rng(0).standard_normal((30, 3))
    np.savez(tmp_path / "t.npz", values=table)
    multi = build(tmp_path, "timeseries", path="t.npz", key="values", length=5)
    sequence, target = multi[24]
    assert sequence.shape == (5, 3) and target.shape == (3,) and target.dtype == torch.float64
    assert np.array_equal(target.numpy(), table[29])
    with pytest.raises(IndexError):
        multi[25]
    with pytest.raises(ConfigError, match="exceeds the 30 rows"):
        build(tmp_path, "timeseries", path="t.npz", key="values", length=30)


# -- through a real server ----------------------------------------------------------------------

CONFIG = """
[datasets.series]
source = "timeseries"
path = "series.npy"
length = 6
horizon = 3
stride = 2
squeeze_target = false

[datasets.table]
source = "arrays"
files = { x = "big.npy", y = "labels.npy" }

[datasets.broken]
source = "image_folder"
root = "imgs"
transforms.image = ["ToTensor"]
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    np.save(
        folder / "series.npy", np.random.default_rng(1).standard_normal((40, 2)).astype(np.float32)
    )
    np.save(folder / "big.npy", np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64))
    np.save(folder / "labels.npy", np.arange(4096) % 3)
    make_image_folder(folder / "imgs", {"x": 4})
    (folder / "imgs" / "x" / "002.jpg").write_bytes(b"truncated")  # sample 2 is corrupt
    (folder / "sources.toml").write_text(CONFIG)
    return folder


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[ServerProcess]:
    with ServerProcess(folder / "sources.toml", workers=2) as server:
        yield server


def test_timeseries_stream_equals_local_windows(folder, server):
    series = np.load(folder / "series.npy")
    sequences, targets = windows(series, 6, 3, 2, False)
    got = batches(server.target, "series", batch_size=5)
    assert np.array_equal(torch.cat([s for s, _ in got]).numpy(), sequences)
    assert np.array_equal(torch.cat([t for _, t in got]).numpy(), targets)
    assert got[0][1].shape == (5, 3, 2)


def test_arrays_stay_memory_mapped_in_the_workers(folder, server):
    got = batches(server.target, "table", batch_size=1024, shuffle=True)
    assert sorted(torch.cat([b["x"][:, 0] for b in got]).tolist()) == [
        64.0 * i for i in range(4096)
    ]
    big = str(folder / "big.npy")
    mapped = [
        pid for pid in worker_pids(server.pid()) if big in Path(f"/proc/{pid}/maps").read_text()
    ]
    assert mapped, "no worker maps big.npy: the array was copied instead of memory-mapped"


def test_a_corrupt_image_fails_only_its_batch_naming_the_index(server):
    assert len(batches(server.target, "broken", batch_size=2, end_batch=1)) == 1  # samples 0, 1
    with pytest.raises(ServerError) as info:
        batches(server.target, "broken", batch_size=2)
    assert info.value.code.name == "INTERNAL"
    assert "dataset 'broken', sample index 2" in info.value.details
    assert "cannot identify image file" in info.value.details


def test_pipeline_reads_labels_without_decoding_images(tmp_path):
    make_image_folder(tmp_path / "imgs", {"a": 3, "b": 1})
    for path in (tmp_path / "imgs").glob("*/*.jpg"):
        path.write_bytes(b"garbage")  # balance must not need to decode anything
    config = DatasetConfig(
        "d", "image_folder", {"root": "imgs"}, {"sampler": {"kind": "weighted", "balance": "label"}}
    )
    pipeline = build_pipeline(config, tmp_path / "c.toml")
    assert pipeline.sampler.weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
