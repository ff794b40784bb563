"""The ``webdataset`` source (real servers) against the ``webdataset`` package's own reader."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from _serverproc import ServerProcess, batchwire_command
from sources_data import ListDataset, as_tensors, assert_stream_equals_local, make_shards

from batchwire.client import RemoteDataset, ServerError
from batchwire.server.config import DatasetConfig
from batchwire.server.sources import build_dataset, webdataset

SHARDS, PER_SHARD = 3, 9  # 27 samples: not a multiple of the batch or the world size

CONFIG = """
[datasets.wds]
source = "webdataset"
shards = "shards/shard-{000000..000002}.tar"
fields = { image = "jpg;png", label = "cls", vector = "npy" }
item = "tuple"

[datasets.everything]
source = "webdataset"
shards = ["shards/shard-000000.tar", "shards/shard-00000{1,2}.tar"]
fields = { meta = "json", chw = "jpg" }
image = "torchrgb"

[datasets.augmented]
source = "webdataset"
shards = "shards"
fields = { image = "jpg", label = "cls" }
image = "pil"
transforms.image = ["ToTensor", { name = "RandomHorizontalFlip", p = 0.5 }]
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wds")
    make_shards(folder / "shards", SHARDS, PER_SHARD)
    path = folder / "wds.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def server(config: Path) -> Iterator[ServerProcess]:
    with ServerProcess(config, workers=2) as server:
        yield server


def reference_samples(config: Path, decoder: str, *keys: str) -> list:
    """All samples in order, read and decoded by the webdataset package itself."""
    import webdataset as wds

    urls = [str(config.parent / "shards" / f"shard-{i:06d}.tar") for i in range(SHARDS)]
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(decoder)
    return [as_tensors(sample) for sample in pipeline.to_tuple(*keys)]


def test_stream_equals_the_webdataset_package_in_a_dataloader(config, server):
    local = ListDataset(reference_samples(config, "rgb8", "jpg;png", "cls", "npy"))
    assert len(local) == SHARDS * PER_SHARD
    assert_stream_equals_local(server.target, "wds", local, batch_size=4)


def test_json_and_float_images_match_the_package(config, server):
    reference = reference_samples(config, "torchrgb", "json", "jpg")
    local = ListDataset([dict(zip(["meta", "chw"], s, strict=True)) for s in reference])
    assert_stream_equals_local(server.target, "everything", local, batch_size=5)
    batch = next(iter(RemoteDataset(server.target, "everything", batch_size=5)))
    assert batch["meta"]["n"].tolist() == [0, 1, 2, 3, 4]
    assert batch["chw"].shape == (5, 3, 12, 16) and batch["chw"].dtype == torch.float32


def test_keys_and_text_items_match_the_package(config, server):
    # Strings cannot go on the wire (a transform must turn them into tensors): items in-process.
    reference = reference_samples(config, "rgb8", "__key__", "txt", "cls")
    options = {
        "shards": "shards",
        "fields": {"k": "__key__", "t": "txt", "c": "cls"},
        "item": "tuple",
    }
    dataset = build_dataset(DatasetConfig("d", "webdataset", options), config)
    assert [dataset[i] for i in range(len(dataset))] == reference
    assert dataset[-1] == ("sample000026", "caption 26", reference[-1][2])


def test_image_transforms_apply_to_decoded_images(server):
    batch = next(iter(RemoteDataset(server.target, "augmented", batch_size=27)))
    images, labels = batch["image"], batch["label"]
    assert images.shape == (27, 3, 12, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64


def test_index_is_built_once_and_read_back(config, server, monkeypatch):
    # The server wrote an index beside each shard; building again must not scan the tars.
    for i in range(SHARDS):
        assert (config.parent / "shards" / f"shard-{i:06d}.tar.idx.npz").is_file()

    def no_scan(path):
        raise AssertionError(f"scanned {path} again")

    monkeypatch.setattr(webdataset, "scan_tar", no_scan)
    dataset = build_dataset(
        DatasetConfig("wds", "webdataset", {"shards": "shards", "fields": ["cls", "npy"]}),
        config,
    )
    assert len(dataset) == 27
    # Per-sample metadata sits in numpy arrays (shared by forked workers), not Python lists.
    assert all(
        isinstance(getattr(dataset, name), np.ndarray) for name in ("shard_of", "offsets", "keys")
    )


def test_a_changed_shard_is_indexed_again(tmp_path):
    paths = make_shards(tmp_path / "shards", 1, 4)
    options = {"shards": "shards", "fields": ["cls"]}
    assert len(build_dataset(DatasetConfig("d", "webdataset", options), tmp_path / "c.toml")) == 4
    make_shards(tmp_path / "shards", 1, 6, seed=1)  # same name, new content
    os.utime(paths[0], ns=(1, 1))  # and surely a new modification time
    assert len(build_dataset(DatasetConfig("d", "webdataset", options), tmp_path / "c.toml")) == 6


def start_error(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    return result.stderr


def test_missing_shard_fails_at_start_up(tmp_path):
    make_shards(tmp_path / "shards", 2, 2)
    body = '[datasets.w]\nsource = "webdataset"\nshards = "shards/shard-{000000..000002}.tar"\nfields = ["cls"]\n'
    error = start_error(tmp_path, body)
    assert f"{tmp_path / 'bad.toml'}: datasets.w.shards: shard not found" in error
    assert "shard-000002.tar" in error


def test_corrupt_tar_fails_at_start_up(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"not a tar file at all" * 100)
    body = '[datasets.w]\nsource = "webdataset"\nshards = "shards"\nfields = ["cls"]\n'
    error = start_error(tmp_path, body)
    assert "datasets.w.shards: cannot index the tar" in error and "shard-000000.tar" in error


def test_missing_field_fails_at_start_up(tmp_path):
    make_shards(tmp_path / "shards", 1, 2)
    body = '[datasets.w]\nsource = "webdataset"\nshards = "shards"\nfields = { label = "cls", img = "png" }\n'
    error = start_error(tmp_path, body)
    assert "datasets.w.fields:" in error
    assert "sample 'sample000000' has no .png for field 'img'" in error


def test_corrupt_member_ends_only_that_stream_naming_dataset_sample_and_shard(tmp_path):
    paths = make_shards(tmp_path / "shards", 2, 3)
    (tmp_path / "c.toml").write_text(
        '[datasets.w]\nsource = "webdataset"\nshards = "shards"\nfields = ["jpg", "cls"]\n'
        '[datasets.ok]\nsource = "webdataset"\nshards = "shards"\nfields = ["cls"]\n'
    )
    with ServerProcess(tmp_path / "c.toml", workers=1) as server:
        # Indexed at start-up; now the second shard's first JPEG is overwritten with junk.
        dataset = build_dataset(
            DatasetConfig("w", "webdataset", {"shards": "shards", "fields": ["jpg"]}),
            tmp_path / "c.toml",
        )
        offset = int(dataset.offsets[3, 0])
        with open(paths[1], "r+b") as handle:
            handle.seek(offset)
            handle.write(b"\0" * 64)
        with pytest.raises(ServerError) as raised:
            list(RemoteDataset(server.target, "w", batch_size=1))
        assert raised.value.code == grpc.StatusCode.INTERNAL
        details = raised.value.details
        assert "dataset 'w', sample index 3" in details
        assert "shard-000001.tar" in details and "'sample000003'" in details
        assert len(list(RemoteDataset(server.target, "ok", batch_size=2))) == 3  # others go on


def test_a_garbled_member_header_fails_at_start_up_instead_of_dropping_samples(tmp_path):
    import tarfile

    paths = make_shards(tmp_path / "shards", 1, 4)
    with tarfile.open(paths[0]) as archive:
        third = archive.getmembers()[2].offset  # a header in the middle of the shard
    with open(paths[0], "r+b") as handle:
        handle.seek(third)
        handle.write(b"\xff" * 100)  # its name and checksum fields: junk
    body = '[datasets.w]\nsource = "webdataset"\nshards = "shards"\nfields = ["cls"]\n'
    error = start_error(tmp_path, body)
    assert "datasets.w.shards: cannot index the tar" in error
    assert f"invalid tar header at byte {third}" in error


def test_a_cut_short_shard_fails_at_start_up(tmp_path):
    paths = make_shards(tmp_path / "shards", 1, 4)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])
    body = '[datasets.w]\nsource = "webdataset"\nshards = "shards"\nfields = ["cls"]\n'
    error = start_error(tmp_path, body)
    assert "datasets.w.shards: cannot index the tar" in error and "shard-000000.tar" in error
