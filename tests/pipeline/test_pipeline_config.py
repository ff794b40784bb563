"""Bad pipeline configs stop ``batchwire serve`` at start-up with the file, the key and the reason."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from _serverproc import batchwire_command
from pipeline_data import make_image_folder

IMAGES = '[datasets.img]\nsource = "image_folder"\nroot = "imgs"\n'
ARRAYS = '[datasets.arr]\nsource = "arrays"\nfiles = { label = "labels.npy" }\n'

CASES = {
    "unknown transform": (
        IMAGES + 'transforms.image = ["ToTensor", { name = "RandomRotate", degrees = 3 }]\n',
        "datasets.img.transforms.image[1].name",
        "unknown transform 'RandomRotate'; expected one of CenterCrop, Compose",
    ),
    "bad transform parameter": (
        IMAGES + 'transforms.image = [{ name = "RandomCrop", size = -4 }]\n',
        "datasets.img.transforms.image[0].size",
        "expected a positive integer or [height, width], got -4",
    ),
    "wrong parameter type": (
        IMAGES + 'transforms.image = [{ name = "RandomHorizontalFlip", p = "half" }]\n',
        "datasets.img.transforms.image[0].p",
        "expected number, got string 'half'",
    ),
    "unknown field": (
        IMAGES + 'transforms.picture = ["ToTensor"]\n',
        "datasets.img.transforms.picture",
        "unknown field; this source's items have image, label",
    ),
    "missing folder": (
        '[datasets.img]\nsource = "image_folder"\nroot = "no_such_folder"\n',
        "datasets.img.root",
        "folder not found",
    ),
    "unknown collate": (
        IMAGES + 'collate = "stack"\n',
        "datasets.img.collate",
        "unknown collate 'stack'",
    ),
    "bad pad table": (
        IMAGES + 'collate = { kind = "pad", padding_value = "zero" }\n',
        "datasets.img.collate.padding_value",
        "expected number or table",
    ),
    "sampler without weights": (
        ARRAYS + 'sampler = { kind = "weighted" }\n',
        "datasets.arr.sampler.kind",
        "the 'weighted' sampler needs weights = FILE or balance = FIELD",
    ),
    "unknown sampler kind": (
        ARRAYS + 'sampler = { kind = "stratified" }\n',
        "datasets.arr.sampler.kind",
        "unknown value 'stratified'",
    ),
    "balance on a missing field": (
        ARRAYS + 'sampler = { balance = "class" }\n',
        "datasets.arr.sampler.balance",
        "cannot read field 'class'",
    ),
    "weights of the wrong length": (
        ARRAYS + 'sampler = { weights = "short.npy" }\n',
        "datasets.arr.sampler.weights",
        "expected 6 weights (one per sample), got shape (4,)",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_pipeline_config_fails_at_start_up(tmp_path, case):
    text, key, reason = CASES[case]
    make_image_folder(tmp_path / "imgs", {"a": 2})
    np.save(tmp_path / "labels.npy", np.array([0, 0, 0, 1, 1, 2]))
    np.save(tmp_path / "short.npy", np.ones(4))
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert f"{config}: {key}: {reason}" in result.stderr, result.stderr
