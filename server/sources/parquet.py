"""``parquet``: rows of Parquet files (pyarrow), columns as fields.

Parquet pages are compressed and encoded, so they cannot be mapped as they
are. With ``cache_dir`` each file is converted once into an uncompressed Arrow
IPC file there (stamped with the source's size and modification time) and
memory-mapped: every worker shares the same pages through the page cache,
and nothing per sample sits on the Python heap. Without ``cache_dir`` each
process reads the columns into Arrow memory.

Column types become: numbers → 0-d tensors of the column's dtype; fixed-size
lists (nested too) → tensors of that shape; variable lists → 1-d tensors;
strings → ``str``; binary columns named in ``images`` (or Hugging Face image
structs ``{bytes, path}``) → images decoded as ``image`` says; other binary
→ ``bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

import numpy as np
import torch

from batchwire.server.config import Table
from batchwire.server.sources import storage
from batchwire.server.sources.decode import IMAGE_MODES, decode_image


def import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "the parquet source needs pyarrow: pip install 'batchwire[sources]'"
        ) from None
    return pa, pq


def fixed_shape(kind: Any) -> tuple[tuple[int, ...], Any] | None:
    """``(shape, value type)`` of a (nested) fixed-size list type; ``None`` for others."""
    pa, _ = import_pyarrow()
    shape: list[int] = []
    while pa.types.is_fixed_size_list(kind):
        shape.append(kind.list_size)
        kind = kind.value_type
    return (tuple(shape), kind) if shape else None


def _is_number(pa: Any, kind: Any) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


class Column:
    """One field: a numpy array where the type allows (shared, mapped), else Arrow values."""

    def __init__(self, name: str, array: Any, image_mode: str | None) -> None:
        pa, _ = import_pyarrow()
        self.name = name
        self.image_mode = image_mode
        self.numpy: np.ndarray | None = None
        self.arrow = array
        kind = array.type
        shaped = fixed_shape(kind)
        if image_mode is not None:
            self.kind = "image"
        elif shaped is not None and array.null_count == 0:
            values = array
            for _ in shaped[0]:
                values = values.flatten()
            self.numpy = values.to_numpy(zero_copy_only=False).reshape(len(array), *shaped[0])
            self.kind = "numpy"
        elif _is_number(pa, kind) and array.null_count == 0:
            self.numpy = array.to_numpy(zero_copy_only=False)
            self.kind = "numpy"
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            self.kind = "list"
        else:
            self.kind = "python"

    def get(self, index: int) -> Any:
        if self.numpy is not None:
            return torch.from_numpy(np.array(self.numpy[index]))  # owns writable memory
        value = self.arrow[index]
        if self.kind == "list":
            return torch.from_numpy(np.array(value.values.to_numpy(zero_copy_only=False)))
        python = value.as_py()
        if self.kind == "image":
            data = python.get("bytes") if isinstance(python, dict) else python
            if not isinstance(data, bytes):
                raise ValueError(f"column {self.name!r}: no image bytes in row {index}")
            return decode_image(data, self.image_mode or "rgb8")
        return python


class ParquetDataset:
    """Item i is ``{field: value}`` (or a tuple in field order) of row i of all files."""

    def __init__(self, table: Any, fields: dict[str, str], images: dict[str, str], item: str):
        self.table = table
        self.columns = [
            Column(name, table.column(column).combine_chunks(), images.get(name))
            for name, column in fields.items()
        ]
        self.field_names = tuple(fields)
        self.item = item
        self.length = table.num_rows

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} rows")
        index = int(index) % self.length
        values = {column.name: column.get(index) for column in self.columns}
        return values if self.item == "dict" else tuple(values.values())

    def field_array(self, name: str) -> np.ndarray | None:
        for column in self.columns:
            if column.name == name and column.numpy is not None and column.numpy.ndim == 1:
                return column.numpy
        return None


def _files(table: Table) -> list[str]:
    value = table.get("path", (str, list))
    patterns = [value] if isinstance(value, str) else value
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise table.error("path", f"expected a path or a non-empty array of them, got {value!r}")
    files: list[str] = []
    for pattern in patterns:
        for location in (storage.resolve(table, n) for n in storage.expand_braces(pattern)):
            if storage.is_url(location):
                if location.endswith(".parquet"):
                    files.append(location)
                else:
                    try:
                        files.extend(storage.list_remote(location, (".parquet",)))
                    except Exception as exc:
                        raise table.error(
                            "path", storage.describe_remote_error(location, exc)
                        ) from None
            elif os.path.isdir(location):
                files.extend(
                    sorted(
                        os.path.join(location, n)
                        for n in os.listdir(location)
                        if n.endswith(".parquet")
                    )
                )
            elif os.path.isfile(location):
                files.append(location)
            else:
                raise table.error("path", f"file not found: {location}")
    if not files:
        raise table.error("path", f"no .parquet files in {value!r}")
    return files


def _mapped(location: str, cache: storage.FileCache | None, columns: list[str] | None) -> Any:
    """The file's table: converted once to Arrow IPC in the cache and mapped, or read."""
    pa, pq = import_pyarrow()
    if storage.is_url(location):
        assert cache is not None
        size = storage.remote_info(location).size
        local = str(cache.get(location, size))
    else:
        local = location
    if cache is None:
        return pq.read_table(local, columns=columns, memory_map=True)
    stat = os.stat(local)
    stamp = f"{location} {stat.st_size} {stat.st_mtime_ns if local == location else ''} {columns}"
    digest = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    folder = cache.folder.parent / f"{cache.folder.name}-arrow"
    folder.mkdir(parents=True, exist_ok=True)
    arrow = folder / f"{digest}-{os.path.basename(location)}.arrow"
    if not arrow.exists():
        data = pq.read_table(local, columns=columns, memory_map=True)
        temporary = arrow.with_name(f"{arrow.name}.tmp{os.getpid()}")
        try:
            with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, data.schema) as out:
                out.write_table(data)
            os.replace(temporary, arrow)  # never a half-written file under the final name
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
    return pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all()


def build(table: Table) -> ParquetDataset:
    table.reject_unknown({"path", "fields", "images", "image", "item", "cache_dir", "cache_bytes"})
    pa, pq = import_pyarrow()
    files = _files(table)
    raw = field_columns(table)
    cache = storage.cache_from(table, needed=any(storage.is_url(f) for f in files))
    wanted = None if raw is None else list(raw.values())
    parts = []
    for location in files:
        try:
            schema = (
                pq.read_schema(location) if not storage.is_url(location) else None
            )  # remote: checked after the download below
            if schema is not None and wanted is not None:
                check_columns(table, location, schema, wanted)
            part = _mapped(location, cache, None if wanted is None else sorted(set(wanted)))
            if wanted is not None:
                check_columns(table, location, part.schema, wanted)
        except (OSError, pa.ArrowException) as exc:
            reason = (
                storage.describe_remote_error(location, exc)
                if storage.is_url(location)
                else f"cannot read {location}: {type(exc).__name__}: {exc}"
            )
            raise table.error("path", reason) from None
        if parts and not part.schema.equals(parts[0].schema):
            raise table.error(
                "path",
                f"{location} has schema {part.schema.to_string(show_schema_metadata=False)!r}, "
                f"unlike {files[0]}: {parts[0].schema.to_string(show_schema_metadata=False)!r}",
            )
        parts.append(part)
    data = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return arrow_dataset(table, data, raw, "path")


def field_columns(table: Table) -> dict[str, str] | None:
    """The ``fields`` key: ``{ field = "column" }`` or ``["column", ...]``; ``None``: all."""
    raw = table.get("fields", (list, dict), None)
    if isinstance(raw, list) and raw and all(isinstance(c, str) for c in raw):
        return {c: c for c in raw}
    if isinstance(raw, dict) and raw and all(isinstance(c, str) for c in raw.values()):
        return dict(raw)
    if raw is not None:
        raise table.error(
            "fields", f"expected {{ field = 'column' }} or ['column', ...], got {raw!r}"
        )
    return None


def arrow_dataset(
    table: Table, data: Any, raw: dict[str, str] | None, where: str
) -> ParquetDataset:
    """The dataset over an Arrow table: checks ``images``, ``image`` and ``item`` against it."""
    pa, _ = import_pyarrow()
    image_mode = table.choice("image", list(IMAGE_MODES), "rgb8")
    image_fields = table.get("images", list, [])
    item = table.choice("item", ["dict", "tuple"], "dict")
    fields = raw if raw is not None else {c: c for c in data.column_names}
    for name in image_fields:
        if name not in fields:
            raise table.error("images", f"{name!r} is not a field; fields: {', '.join(fields)}")
        kind = data.schema.field(fields[name]).type
        if not (
            pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_struct(kind)
        ):
            raise table.error("images", f"column {fields[name]!r} holds {kind}, not image bytes")
    images = {name: image_mode for name in image_fields}
    for name, column in fields.items():  # Hugging Face Image() features decode by default
        kind = data.schema.field(column).type
        if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            images.setdefault(name, image_mode)
    if data.num_rows == 0:
        raise table.error(where, "the files hold no rows")
    return ParquetDataset(data, fields, images, item)


def check_columns(table: Table, location: str, schema: Any, wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise table.error(
            "fields",
            f"{location} has no column {', '.join(map(repr, missing))}; it has {', '.join(schema.names)}",
        )
