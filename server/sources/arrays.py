"""``arrays``: named fields from .npy files or one .npz, memory-mapped.

Memory maps keep per-sample data out of the Python heap: forked or spawned
workers share the file's pages through the page cache instead of each holding
a copy (copy-on-access of Python objects is a classic DataLoader memory trap).
Members of an uncompressed .npz are mapped in place; compressed members
cannot be, and are loaded into memory. A URL (``s3://...``) is downloaded into
``cache_dir`` first and mapped there: the cache must hold all of a dataset's
arrays, which stay mapped for the server's life.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchwire.server.config import Table
from batchwire.server.direct_collate import Reserve, gather_into
from batchwire.server.sources import storage
from batchwire.v1 import batchwire_pb2 as pb


def map_npy(path: Path) -> np.ndarray:
    """Memory-maps a .npy file; raises ``ValueError`` saying what is wrong with it."""
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty (0 bytes)")
        return np.load(path, mmap_mode="r")
    except (OSError, EOFError) as exc:  # EOFError: a header cut short
        raise ValueError(str(exc)) from None


def _map_npz_member(path: Path, member: zipfile.ZipInfo) -> np.ndarray:
    """Memory-maps one uncompressed .npy member of a .npz file."""
    with path.open("rb") as handle:
        # The local file header: 30 bytes, then the name and an extra field.
        handle.seek(member.header_offset + 26)
        name_length = int.from_bytes(handle.read(2), "little")
        extra_length = int.from_bytes(handle.read(2), "little")
        start = member.header_offset + 30 + name_length + extra_length
        handle.seek(start)
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(handle)
        data_offset = handle.tell()
    order = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order=order)


def load_npz(path: Path, names: list[str] | None) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        for name in names if names is not None else list(members):
            if name not in members:
                raise KeyError(
                    f"{path.name} has no array {name!r}; it has {', '.join(sorted(members))}"
                )
            info = members[name]
            if info.compress_type == zipfile.ZIP_STORED:
                arrays[name] = _map_npz_member(path, info)
            else:
                with archive.open(info) as handle:
                    arrays[name] = np.lib.format.read_array(handle)
    return arrays


class ArrayDataset:
    """Item i is ``{field: array[i]}`` (or a tuple in field order), as tensors."""

    def __init__(self, arrays: dict[str, np.ndarray], item: str) -> None:
        self.arrays = arrays
        self.item = item
        self.length = len(next(iter(arrays.values())))
        self.field_names = tuple(arrays)

    def field_array(self, name: str) -> np.ndarray | None:
        """A field's values for all samples, straight from the map (for samplers)."""
        return self.arrays.get(name)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        # np.array copies the sample out of the read-only map: tensors must own writable memory.
        values = {
            name: torch.from_numpy(np.array(array[index])) for name, array in self.arrays.items()
        }
        return values if self.item == "dict" else tuple(values.values())

    def load_batch(self, indices: Sequence[int]) -> Any:
        """``default_collate([self[i] for i in indices])``, one fancy-index read per field."""
        rows = self._rows(indices)
        values = {name: torch.from_numpy(array[rows]) for name, array in self.arrays.items()}
        # default_collate turns a batch of tuples into a list
        return values if self.item == "dict" else list(values.values())

    def load_batch_into(self, indices: Sequence[int], reserve: Reserve) -> pb.BatchHeader | None:
        """``load_batch``, encoded straight into ``reserve(size)``; None: not planned (see
        ``direct_collate.gather_into``)."""
        return gather_into(self.arrays, self._rows(indices), self.item == "tuple", reserve)

    def _rows(self, indices: Sequence[int]) -> np.ndarray:
        rows = np.asarray(indices, dtype=np.int64)
        if len(rows) and not (rows.min() >= 0 and rows.max() < self.length):
            raise IndexError(f"an index is out of range for length {self.length}")
        return rows


def fetch_remote(table: Table, name: str, cache: storage.FileCache | None) -> str | None:
    """A ``s3://...`` (any fsspec URL) value of ``name``, downloaded; ``None`` for a local path."""
    value = table.data.get(name)
    if not isinstance(value, str) or not storage.is_url(value):
        return None
    if cache is None:
        raise table.error(name, "a URL needs cache_dir (a local folder for the downloads)")
    try:
        return str(cache.get(value, storage.remote_info(value).size))
    except Exception as exc:  # refused credentials, no such key, larger than the cache
        raise table.error(name, storage.describe_remote_error(value, exc)) from None


def build(table: Table) -> ArrayDataset:
    table.reject_unknown({"path", "files", "fields", "item", "cache_dir", "cache_bytes"})
    files = table.data.get("files")
    values = [table.data.get("path"), *(files.values() if isinstance(files, dict) else ())]
    cache = storage.cache_from(
        table, needed=any(isinstance(v, str) and storage.is_url(v) for v in values)
    )
    item = table.choice("item", ["dict", "tuple"], "dict")
    if ("path" in table.data) == ("files" in table.data):
        raise table.error("path", 'give either path = "data.npz" or files = { field = "file.npy" }')
    if "path" in table.data:
        fetched = fetch_remote(table, "path", cache)
        path = Path(fetched) if fetched else table.path("path")
        fields = table.get("fields", list, None)
        try:
            arrays = load_npz(path, fields)
        except (KeyError, zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise table.error("path", f"cannot read {path}: {exc}") from None
    else:
        files = table.table("files")
        arrays = {}
        for name in files.data:
            fetched = fetch_remote(files, name, cache)
            path = Path(fetched) if fetched else files.path(name)
            try:
                arrays[name] = map_npy(path)
            except ValueError as exc:
                raise files.error(name, f"cannot read {path}: {exc}") from None
    if not arrays:
        raise table.error("fields", "no arrays selected")
    lengths = {name: (array.shape[0] if array.ndim else None) for name, array in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise table.error(
            "files" if "files" in table.data else "path",
            f"arrays must share their first dimension, got {lengths}",
        )
    return ArrayDataset(arrays, item)
