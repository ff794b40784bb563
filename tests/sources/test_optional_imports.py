"""The core server and local sources import without the ``sources`` extra (pyarrow, fsspec)."""

from __future__ import annotations

import subprocess
import sys

from sources_data import make_shards

SCRIPT = """
import sys
for name in ("pyarrow", "fsspec", "s3fs"):
    sys.modules[name] = None  # importing them now raises ImportError
from batchwire.server.config import DatasetConfig
from batchwire.server.sources import build_dataset
from pathlib import Path
import batchwire.server.app
options = {"shards": "shards", "fields": ["cls"]}
print(len(build_dataset(DatasetConfig("w", "webdataset", options), Path(sys.argv[1]))))
try:
    build_dataset(DatasetConfig("p", "parquet", {"path": "x.parquet"}), Path(sys.argv[1]))
except ImportError as exc:
    print(exc)
"""


def test_local_sources_work_without_pyarrow_or_fsspec(tmp_path):
    make_shards(tmp_path / "shards", 1, 3)
    (tmp_path / "x.parquet").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "c.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "3",
        "the parquet source needs pyarrow: pip install 'batchwire[sources]'",
    ]
