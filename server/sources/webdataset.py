"""``webdataset``: samples from tar shards in the WebDataset layout, with random access.

A member ``dir/key.ext`` belongs to sample ``dir/key``; consecutive members
with the same key form one sample (the WebDataset rule). Start-up reads each
shard's tar headers once and saves ``(name, offset, size)`` of its members in
an index file, beside the shard (``SHARD.idx.npz``) where that folder is
writable, else in ``cache_dir/index``; later start-ups (and every worker) load
the index instead of scanning. A sample's members lie next to each other, so
sample ``i`` is one ``os.pread`` of its span. Per-sample metadata lives in
numpy arrays (forked workers share them; Python lists would be copied page
by page).

Remote shards (``s3://...``) go through the bounded ``storage.FileCache``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from batchwire.server.config import Table
from batchwire.server.sources import storage
from batchwire.server.sources.decode import IMAGE_MODES, decode

_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # WebDataset's base_plus_ext
INDEX_VERSION = 1


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, lowercased extension; ``None``: not a field."""
    match = _NAME.match(name)
    if match is None:
        return None
    key, extension = match.groups()
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None  # WebDataset's meta files
    return key, extension.lower()


def scan_tar(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, data offsets and sizes of a tar's regular files, reading only headers."""
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    with tarfile.open(path, mode="r:") as archive:  # "r:": a compressed tar cannot be indexed
        for member in archive:
            if member.isfile():
                names.append(member.name)
                offsets.append(member.offset_data)
                sizes.append(member.size)
        end = archive.offset  # where tarfile stopped reading headers
    file_size = os.path.getsize(path)
    if offsets and offsets[-1] + sizes[-1] > file_size:
        raise tarfile.ReadError(f"the tar is cut short: {names[-1]} ends past byte {file_size}")
    # tarfile ends quietly at a bad header after the first: only zero padding may follow.
    with open(path, "rb") as handle:
        handle.seek(end)
        while block := handle.read(1 << 20):
            if block.count(0) != len(block):
                raise tarfile.ReadError(f"invalid tar header at byte {end}")
    return names, np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)


class ShardIndex:
    """One shard's members, saved as an .npz and checked against the shard's size and version."""

    def __init__(self, names: list[str], offsets: np.ndarray, sizes: np.ndarray) -> None:
        self.names = names
        self.offsets = offsets
        self.sizes = sizes

    def save(self, path: Path, stamp: str) -> None:
        encoded = [name.encode() for name in self.names]
        temporary = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")
        np.savez(
            temporary,
            names=np.frombuffer(b"".join(encoded), dtype=np.uint8),
            ends=np.cumsum([len(e) for e in encoded], dtype=np.int64),
            offsets=self.offsets,
            sizes=self.sizes,
            stamp=np.frombuffer(stamp.encode(), dtype=np.uint8),
        )
        os.replace(temporary, path)  # a half-written index is never read

    @classmethod
    def load(cls, path: Path, stamp: str) -> ShardIndex | None:
        try:
            with np.load(path) as saved:
                if saved["stamp"].tobytes().decode() != stamp:
                    return None
                buffer = saved["names"].tobytes()
                ends = saved["ends"]
                starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
                names = [buffer[s:e].decode() for s, e in zip(starts, ends, strict=True)]
                return cls(names, saved["offsets"], saved["sizes"])
        except (OSError, ValueError, KeyError):
            return None


class Shard:
    """A shard's location, and how to reach its bytes locally."""

    def __init__(self, location: str, cache: storage.FileCache | None) -> None:
        self.location = location
        self.remote = storage.is_url(location)
        self.cache = cache
        if self.remote:
            info = storage.remote_info(location)
            self.size = info.size
            self.stamp = f"v{INDEX_VERSION} {info.size} {info.version}"
        else:
            stat = os.stat(location)
            self.size = stat.st_size
            self.stamp = f"v{INDEX_VERSION} {stat.st_size} {stat.st_mtime_ns}"

    def local_path(self) -> str:
        if not self.remote:
            return self.location
        assert self.cache is not None
        return str(self.cache.get(self.location, self.size))

    def index_path(self) -> Path | None:
        if not self.remote and os.access(os.path.dirname(self.location), os.W_OK):
            return Path(self.location + ".idx.npz")
        if self.cache is None:
            return None
        folder = self.cache.folder.parent / f"{self.cache.folder.name}-index"
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(self.location.encode()).hexdigest()[:16]
        return folder / f"{digest}-{os.path.basename(self.location)}.idx.npz"

    def index(self) -> ShardIndex:
        path = self.index_path()
        if path is not None and (saved := ShardIndex.load(path, self.stamp)) is not None:
            return saved
        built = ShardIndex(*scan_tar(self.local_path()))
        if path is not None:
            with contextlib.suppress(OSError):  # a read-only folder: scan again next time
                built.save(path, self.stamp)
        return built


class WebDataset:
    """Item i is ``{field: value}`` (or a tuple in field order) of the i-th sample of all shards."""

    def __init__(
        self,
        shards: list[Shard],
        fields: dict[str, tuple[str, ...]],
        image_mode: str,
        item: str,
        index: dict[str, np.ndarray],
    ) -> None:
        self.shards = shards
        self.field_names = tuple(fields)
        self.image_mode = image_mode
        self.item = item
        self.shard_of = index["shard"]  # int32[n]
        self.offsets = index["offsets"]  # int64[n, fields]; -1 for __key__
        self.sizes = index["sizes"]
        self.extensions = index["extensions"]  # int16[n, fields] into self.extension_names
        self.extension_names = index["extension_names"]
        self.keys = index["keys"]  # uint8 buffer, ends in key_ends
        self.key_ends = index["key_ends"]
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.shard_of)

    def key(self, index: int) -> str:
        start = self.key_ends[index - 1] if index else 0
        return self.keys[start : self.key_ends[index]].tobytes().decode()

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self.shards[shard].remote:  # the cache may evict a closed file: open per read
            for attempt in range(3):
                try:
                    fd = os.open(self.shards[shard].local_path(), os.O_RDONLY)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._files, self._pid = {}, os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.shards[shard].location, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = int(index) % len(self)
        shard = int(self.shard_of[index])
        offsets, sizes = self.offsets[index], self.sizes[index]
        present = offsets >= 0
        values: dict[str, Any] = {}
        where = f"shard {self.shards[shard].location}, key {self.key(index)!r}"
        try:
            if present.any():
                start = int(offsets[present].min())
                span = int((offsets + sizes)[present].max()) - start
                data = self._read(shard, start, span)  # the sample's members: one read
                if len(data) != span:
                    raise OSError(f"read {len(data)} of {span} bytes: the shard is cut short")
            for column, name in enumerate(self.field_names):
                if not present[column]:
                    values[name] = self.key(index)
                    continue
                begin = int(offsets[column]) - start
                member = data[begin : begin + int(sizes[column])]
                extension = str(self.extension_names[self.extensions[index, column]])
                values[name] = decode(extension, member, self.image_mode)
        except Exception as exc:
            raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from exc
        return values if self.item == "dict" else tuple(values.values())


def _group(
    names: list[str], offsets: np.ndarray, sizes: np.ndarray
) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Consecutive members with one key → ``(key, {extension: (offset, size)})``."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for name, offset, size in zip(names, offsets.tolist(), sizes.tolist(), strict=True):
        parts = split_name(name)
        if parts is None:
            continue
        key, extension = parts
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][extension] = (offset, size)
    return samples


def build_index(
    shards: list[Shard], fields: dict[str, tuple[str, ...]], table: Table
) -> dict[str, np.ndarray]:
    """The numpy arrays of every sample's members; a sample missing a field fails start-up."""
    shard_of: list[int] = []
    offsets: list[list[int]] = []
    sizes: list[list[int]] = []
    extension_ids: list[list[int]] = []
    extension_names: dict[str, int] = {}
    keys: list[bytes] = []
    for number, shard in enumerate(shards):
        try:
            index = shard.index()
        except (tarfile.TarError, OSError, ValueError) as exc:
            reason = (
                storage.describe_remote_error(shard.location, exc)
                if shard.remote
                else f"{shard.location}: {type(exc).__name__}: {exc}"
            )
            raise table.error("shards", f"cannot index the tar: {reason}") from None
        for key, members in _group(index.names, index.offsets, index.sizes):
            row_offsets, row_sizes, row_ids = [], [], []
            for name, choices in fields.items():
                if choices == ("__key__",):
                    row_offsets.append(-1), row_sizes.append(0), row_ids.append(0)
                    continue
                found = next((e for e in choices if e in members), None)
                if found is None:
                    raise table.error(
                        "fields",
                        f"{shard.location}: sample {key!r} has no {' or '.join('.' + c for c in choices)} "
                        f"for field {name!r}; it has {', '.join('.' + e for e in sorted(members))}",
                    )
                row_offsets.append(members[found][0])
                row_sizes.append(members[found][1])
                row_ids.append(extension_names.setdefault(found, len(extension_names)))
            shard_of.append(number)
            offsets.append(row_offsets)
            sizes.append(row_sizes)
            extension_ids.append(row_ids)
            keys.append(key.encode())
    width = len(fields)
    return {
        "shard": np.asarray(shard_of, dtype=np.int32),
        "offsets": np.asarray(offsets, dtype=np.int64).reshape(-1, width),
        "sizes": np.asarray(sizes, dtype=np.int64).reshape(-1, width),
        "extensions": np.asarray(extension_ids, dtype=np.int16).reshape(-1, width),
        "extension_names": np.asarray(list(extension_names) or [""]),
        "keys": np.frombuffer(b"".join(keys), dtype=np.uint8),
        "key_ends": np.cumsum([len(k) for k in keys], dtype=np.int64),
    }


def shard_locations(table: Table) -> list[str]:
    """The ``shards`` key: a brace pattern, a list of them, or a folder of .tar files."""
    value = table.get("shards", (str, list))
    patterns = [value] if isinstance(value, str) else value
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise table.error(
            "shards", f"expected a pattern or a non-empty array of them, got {value!r}"
        )
    locations = [
        storage.resolve(table, name) for p in patterns for name in storage.expand_braces(p)
    ]
    if len(locations) == 1 and not storage.is_url(locations[0]) and os.path.isdir(locations[0]):
        folder = locations[0]
        locations = sorted(
            os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar")
        )
        if not locations:
            raise table.error("shards", f"no .tar files in {folder}")
    return locations


def parse_fields(table: Table) -> dict[str, tuple[str, ...]]:
    """``fields = ["jpg", "cls"]`` or ``{ image = "jpg;png", label = "cls" }`` → name: extensions."""
    value = table.get("fields", (list, dict))
    pairs = value.items() if isinstance(value, dict) else ((e, e) for e in value)
    fields = {}
    for name, spec in pairs:
        if not isinstance(spec, str) or not spec or not isinstance(name, str):
            raise table.error("fields", f"expected extensions like 'jpg;png', got {spec!r}")
        fields[name] = tuple(e.strip().lower().lstrip(".") for e in spec.split(";"))
    if not fields:
        raise table.error("fields", "no fields selected")
    return fields


def build(table: Table) -> WebDataset:
    table.reject_unknown({"shards", "fields", "image", "item", "cache_dir", "cache_bytes"})
    fields = parse_fields(table)
    image_mode = table.choice("image", list(IMAGE_MODES), "rgb8")
    item = table.choice("item", ["dict", "tuple"], "dict")
    locations = shard_locations(table)
    cache = storage.cache_from(table, needed=any(storage.is_url(p) for p in locations))
    shards = []
    for location in locations:
        try:
            shards.append(Shard(location, cache))
        except FileNotFoundError:
            raise table.error("shards", f"shard not found: {location}") from None
        except Exception as exc:  # remote: refused credentials, no such bucket, ...
            raise table.error("shards", storage.describe_remote_error(location, exc)) from None
    too_big = [s for s in shards if s.remote and cache is not None and s.size > cache.max_bytes]
    if too_big:
        raise table.error(
            "cache_bytes",
            f"{too_big[0].location} is {too_big[0].size} bytes; the cache must hold the largest shard",
        )
    index = build_index(shards, fields, table)
    if not len(index["shard"]):
        raise table.error("shards", f"no samples in {len(shards)} shard(s)")
    return WebDataset(shards, fields, image_mode, item, index)
