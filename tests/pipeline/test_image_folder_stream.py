"""An image folder of generated JPEGs, served with random crop and flip (real servers).

The stream equals a local Dataset + the same transforms + DataLoader seeded
through batchwire's per-sample RNG; it is bit-identical with 1 and 4 workers;
epochs differ in their augmentations; ``batchwire inspect`` describes it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _serverproc import ServerProcess, batchwire_command
from conftest import assert_same_batch
from pipeline_data import SeededDataset, batches, make_image_folder
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from batchwire.server import transforms as T

CONFIG = """
[datasets.images]
source = "image_folder"
root = "images"
transforms.image = [
  "ToTensor",
  { name = "RandomCrop", size = 16, padding = 2 },
  { name = "RandomHorizontalFlip", p = 0.5 },
  { name = "Normalize", mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] },
]

[datasets.resized]
source = "image_folder"
root = "images"
mode = "L"
transforms.image = [{ name = "Resize", size = 12 }, { name = "CenterCrop", size = [10, 12] }, "ToTensor"]
"""

COUNTS = {"cat": 13, "dog": 7, "emu": 9}  # 29 images: not a multiple of the batch or world size


class LocalImageFolder(Dataset):
    """A plain local image folder, written here from the torchvision rules, not from batchwire."""

    def __init__(self, root: Path) -> None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.items = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((root / name).iterdir())
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.items[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label


LOCAL_IMAGE_TRANSFORM = T.Compose(
    [
        T.ToTensor(),
        T.RandomCrop(16, padding=2),
        T.RandomHorizontalFlip(0.5),
        T.Normalize([0.5] * 3, [0.25] * 3),
    ]
)


def local_transform(item, generator):
    image, label = item
    return LOCAL_IMAGE_TRANSFORM(image, generator), label


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imagefolder")
    make_image_folder(folder / "images", COUNTS)
    path = folder / "images.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def server(config: Path) -> Iterator[ServerProcess]:
    with ServerProcess(config, workers=1) as server:
        yield server


@pytest.mark.parametrize(("epoch", "world_size"), [(0, 1), (1, 2)])
def test_stream_equals_local_dataloader_with_seeded_transforms(config, server, epoch, world_size):
    local = SeededDataset(
        LocalImageFolder(config.parent / "images"), local_transform, seed=5, epoch=epoch
    )
    for rank in range(world_size):
        sampler = DistributedSampler(local, num_replicas=world_size, rank=rank, seed=5)
        sampler.set_epoch(epoch)
        expected = list(DataLoader(local, batch_size=4, sampler=sampler))
        actual = batches(
            server.target,
            "images",
            batch_size=4,
            shuffle=True,
            seed=5,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
        )
        assert len(actual) == len(expected) > 0
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_batch(a, e, f"rank {rank} batch {i}")
        assert actual[0][0].shape == (4, 3, 16, 16) and actual[0][0].dtype == torch.float32


def test_one_worker_and_four_workers_give_identical_batches(config, server):
    with ServerProcess(config, workers=4) as four:
        for epoch in (0, 1):
            one_batches = batches(server.target, "images", batch_size=3, seed=9, epoch=epoch)
            four_batches = batches(four.target, "images", batch_size=3, seed=9, epoch=epoch)
            assert len(one_batches) == len(four_batches) == 10
            for i, (a, b) in enumerate(zip(one_batches, four_batches, strict=True)):
                assert_same_batch(a, b, f"epoch {epoch} batch {i}")


def test_epochs_draw_different_augmentations(server):
    # No shuffle: both epochs list the same images in the same order, so only
    # the augmentation can differ.
    epoch0 = torch.cat([x for x, _ in batches(server.target, "images", batch_size=8, epoch=0)])
    epoch1 = torch.cat([x for x, _ in batches(server.target, "images", batch_size=8, epoch=1)])
    again0 = torch.cat([x for x, _ in batches(server.target, "images", batch_size=8, epoch=0)])
    assert torch.equal(epoch0, again0)
    differing = sum(not torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))
    assert differing > len(epoch0) // 2, f"only {differing} of {len(epoch0)} images changed"


def test_resize_and_center_crop_equal_the_local_pipeline(config, server):
    pipeline = T.Compose([T.Resize(12), T.CenterCrop([10, 12]), T.ToTensor()])
    local = LocalImageFolder(config.parent / "images")
    expected = torch.stack(
        [pipeline(local[i][0].convert("L"), torch.Generator()) for i in range(len(local))]
    )
    got = torch.cat([x for x, _ in batches(server.target, "resized", batch_size=10)])
    assert got.shape == (29, 1, 10, 12)  # 20x24 -> shorter edge 12 -> 12x14 -> crop 10x12
    assert torch.equal(got, expected)


def test_labels_follow_sorted_class_folders(server):
    labels = torch.cat([y for _, y in batches(server.target, "images", batch_size=29)])
    assert labels.tolist() == [0] * 13 + [1] * 7 + [2] * 9


def test_inspect_prints_length_fields_transforms_and_statistics(server):
    result = subprocess.run(
        [*batchwire_command(), "inspect", "images", "--target", server.target, "--batch-size", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BATCHWIRE_TARGET": ""},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "length:  29" in out
    assert "0: float32 [3, 16, 16]" in out and "1: int64 []" in out
    assert "image: Compose([ToTensor(), RandomCrop(size=[16, 16], padding=2" in out
    assert "collate: default" in out
    assert "min " in out and "max " in out and "mean " in out
