"""``hf_dataset``: a Hugging Face dataset saved with ``save_to_disk``, memory-mapped.

``save_to_disk`` writes Arrow IPC stream files listed in ``state.json``
(``DatasetDict``: one folder per split, named in ``dataset_dict.json``). They
are mapped in place with pyarrow, so the ``datasets`` library is not needed
to serve them, and every worker shares the pages. Features map to fields as
in the ``parquet`` source: ``Image()`` columns decode (``image`` mode,
default ``torchrgb8``: CHW uint8, as ``with_format("torch")`` gives),
``ClassLabel`` and numbers become 0-d tensors, fixed-length ``Sequence``
tensors of their shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchwire.server.config import Table
from batchwire.server.sources.parquet import (
    ParquetDataset,
    arrow_dataset,
    check_columns,
    field_columns,
    import_pyarrow,
)


def data_files(table: Table, root: Path, split: str | None) -> list[Path]:
    """The Arrow files of the saved dataset (of ``split`` for a ``DatasetDict``)."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if split is None or split not in splits:
            raise table.error(
                "split", f"{root} is a DatasetDict; expected split = one of {', '.join(splits)}"
            )
        root = root / split
    elif split is not None:
        raise table.error("split", f"{root} holds one dataset, not a DatasetDict with splits")
    state = root / "state.json"
    if not state.is_file():
        raise table.error("path", f"{root} is not a folder written by save_to_disk (no state.json)")
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise table.error("path", f"cannot read {state}: {type(exc).__name__}: {exc}") from None
    return [root / name for name in names]


def build(table: Table) -> ParquetDataset:
    table.reject_unknown({"path", "split", "fields", "images", "image", "item"})
    pa, _ = import_pyarrow()
    root = table.path("path", must_exist=False)
    if not root.is_dir():
        raise table.error("path", f"folder not found: {root}")
    files = data_files(table, root, table.get("split", str, None))
    columns = field_columns(table)
    parts: list[Any] = []
    for path in files:
        try:  # zero-copy: the table's buffers point into the map
            part = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowException) as exc:
            raise table.error("path", f"cannot read {path}: {type(exc).__name__}: {exc}") from None
        if columns is not None:
            check_columns(table, str(path), part.schema, list(columns.values()))
        parts.append(part)
    data = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if "image" not in table.data:  # the datasets library's torch format: CHW uint8
        table = Table({**table.data, "image": "torchrgb8"}, file=table.file, prefix=table.prefix)
    return arrow_dataset(table, data, columns, "path")
