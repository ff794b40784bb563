"""The ``parquet`` source (real servers) against rows read by pyarrow itself."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _serverproc import ServerProcess, batchwire_command
from sources_data import ListDataset, assert_stream_equals_local, make_parquet

from batchwire.server.config import DatasetConfig
from batchwire.server.sources import build_dataset

FILES, ROWS = 2, 13  # 26 rows: not a multiple of the batch or the world size

CONFIG = """
[datasets.mapped]
source = "parquet"
path = "table"
fields = { x = "x", grid = "grid", label = "label", score = "score", tokens = "tokens", picture = "png", hf = "hf_image" }
images = ["picture"]
cache_dir = "cache"

[datasets.in_memory]
source = "parquet"
path = ["table/part-0.parquet", "table/part-1.parquet"]
fields = ["label", "x"]
item = "tuple"
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("parquet")
    make_parquet(folder / "table", FILES, ROWS)
    path = folder / "parquet.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def server(config: Path) -> Iterator[ServerProcess]:
    with ServerProcess(config, workers=2) as server:
        yield server


def image(data: bytes) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return torch.from_numpy(np.array(picture.convert("RGB")))


def reference_rows(config: Path) -> list[dict]:
    """Rows as pyarrow reads them (``to_pylist``), turned into tensors here."""
    import pyarrow.parquet as pq

    rows = []
    for part in range(FILES):
        for row in pq.read_table(config.parent / "table" / f"part-{part}.parquet").to_pylist():
            rows.append(
                {
                    "x": torch.tensor(row["x"], dtype=torch.float32),
                    "grid": torch.tensor(row["grid"], dtype=torch.int16),
                    "label": torch.tensor(row["label"], dtype=torch.int64),
                    "score": torch.tensor(row["score"], dtype=torch.float32),
                    "tokens": torch.tensor(row["tokens"], dtype=torch.int32),
                    "picture": image(row["png"]),
                    "hf": image(row["hf_image"]["bytes"]),
                }
            )
    return rows


def test_mapped_stream_equals_pyarrow_rows_in_a_dataloader(config, server):
    rows = reference_rows(config)
    assert len(rows) == FILES * ROWS
    assert_stream_equals_local(server.target, "mapped", ListDataset(rows), batch_size=4)
    # converted once to Arrow IPC files in the cache, which every worker maps
    assert len(list((config.parent / "cache-arrow").glob("*.arrow"))) == FILES


def test_in_memory_tuples_equal_pyarrow_rows(config, server):
    rows = [(row["label"], row["x"]) for row in reference_rows(config)]
    assert_stream_equals_local(server.target, "in_memory", ListDataset(rows), batch_size=5)


def test_numeric_columns_are_numpy_arrays_for_samplers(config):
    options = {"path": "table", "fields": ["label", "tokens"], "cache_dir": "cache"}
    dataset = build_dataset(DatasetConfig("d", "parquet", options), config)
    assert isinstance(dataset.field_array("label"), np.ndarray)
    assert dataset.field_array("label").shape == (26,)


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


def test_a_column_the_schema_lacks_fails_at_start_up(tmp_path):
    make_parquet(tmp_path / "t", 1, 3)
    error = start_error(
        tmp_path, '[datasets.p]\nsource = "parquet"\npath = "t"\nfields = ["label", "caption"]\n'
    )
    assert f"{tmp_path / 'bad.toml'}: datasets.p.fields:" in error
    assert "has no column 'caption'; it has x, grid, label" in error


def test_image_decoding_of_a_number_column_fails_at_start_up(tmp_path):
    make_parquet(tmp_path / "t", 1, 3)
    body = '[datasets.p]\nsource = "parquet"\npath = "t"\nfields = ["label"]\nimages = ["label"]\n'
    assert "datasets.p.images: column 'label' holds int64, not image bytes" in start_error(
        tmp_path, body
    )


def test_files_with_different_schemas_fail_at_start_up(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_parquet(tmp_path / "t", 1, 3)
    pq.write_table(pa.table({"label": pa.array([1.5])}), tmp_path / "t" / "part-9.parquet")
    body = '[datasets.p]\nsource = "parquet"\npath = "t"\nfields = ["label"]\n'
    error = start_error(tmp_path, body)
    assert "datasets.p.path:" in error and "part-9.parquet has schema" in error


def test_missing_file_fails_at_start_up(tmp_path):
    body = '[datasets.p]\nsource = "parquet"\npath = "nope.parquet"\n'
    assert "datasets.p.path: file not found" in start_error(tmp_path, body)
