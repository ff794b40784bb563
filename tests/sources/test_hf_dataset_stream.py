"""The ``hf_dataset`` source (real server) against the ``datasets`` library's own torch format."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _serverproc import ServerProcess, batchwire_command
from sources_data import ListDataset, assert_stream_equals_local

ROWS = 23

CONFIG = """
[datasets.hf]
source = "hf_dataset"
path = "saved"
fields = ["x", "label", "img"]

[datasets.hf_split]
source = "hf_dataset"
path = "saved_dict"
split = "test"
fields = { features = "x", target = "label" }
item = "tuple"
"""


def make_dataset(rows: int):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "x": datasets.Sequence(datasets.Value("float32"), length=3),
            "label": datasets.ClassLabel(names=["cat", "dog", "emu"]),
            "img": datasets.Image(),
            "caption": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "x": rng.standard_normal((rows, 3)).astype(np.float32).tolist(),
            "label": rng.integers(0, 3, rows).tolist(),
            "img": [
                Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
                for _ in range(rows)
            ],
            "caption": [f"row {i}" for i in range(rows)],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import datasets

    folder = tmp_path_factory.mktemp("hf")
    make_dataset(ROWS).save_to_disk(str(folder / "saved"))
    datasets.DatasetDict({"train": make_dataset(5), "test": make_dataset(ROWS)}).save_to_disk(
        str(folder / "saved_dict")
    )
    path = folder / "hf.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def server(config: Path) -> Iterator[ServerProcess]:
    with ServerProcess(config, workers=2) as server:
        yield server


def test_stream_equals_the_datasets_library_in_a_dataloader(config, server):
    import datasets

    reference = datasets.load_from_disk(str(config.parent / "saved")).with_format(
        "torch", columns=["x", "label", "img"]
    )
    local = ListDataset([reference[i] for i in range(len(reference))])
    assert_stream_equals_local(server.target, "hf", local, batch_size=4)


def test_a_split_of_a_dataset_dict_renamed_as_tuples(config, server):
    import datasets

    reference = datasets.load_from_disk(str(config.parent / "saved_dict"))["test"].with_format(
        "torch"
    )
    local = ListDataset([(row["x"], row["label"]) for row in reference])
    assert_stream_equals_local(server.target, "hf_split", local, batch_size=5)


def test_a_dataset_dict_without_a_split_fails_at_start_up(config):
    path = config.parent / "bad.toml"
    path.write_text('[datasets.h]\nsource = "hf_dataset"\npath = "saved_dict"\n')
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{path}: datasets.h.split:" in result.stderr and "train" in result.stderr
