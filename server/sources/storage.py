"""Where a source's files live: local paths, or fsspec URLs fetched into a bounded cache.

A local file is read in place. A remote file (``s3://bucket/key``, or any
other fsspec URL) is downloaded whole into ``cache_dir`` before it is read, so
random access reads a local file. The cache is shared by every worker process
(and every server pointed at the same folder):

- a download goes to a temporary name and is renamed into place, so a partial
  file is never seen;
- one lock file per entry: concurrent workers wait for the first download
  instead of fetching the same file again;
- space is reserved (the temporary file is sized up front) and older entries
  are evicted, least recently used first, under one folder-wide lock, so the
  folder never holds more than ``cache_bytes``.

fsspec (and s3fs for ``s3://``) are imported only when a URL is used.
Credentials come from the usual places (AWS_* environment variables, config
files); they are never logged, and errors carry only the URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchwire.server.config import Table

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
DEFAULT_CACHE_BYTES = 10 << 30


def is_url(location: str) -> bool:
    return bool(_URL.match(location)) and not location.startswith("file://")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` lists too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        parts = [f"{n:0{width}d}" for n in range(int(first), int(last) + step, step)]
    else:
        parts = body.split(",")
    return [name for part in parts for name in expand_braces(head + part + tail)]


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)``; an ``endpoint_url`` env var is honoured for s3."""
    try:
        import fsspec
    except ImportError:
        raise ValueError(
            f"{url} needs fsspec (and s3fs for s3://): pip install 'batchwire[sources]'"
        ) from None
    protocol = url.split("://", 1)[0]
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint:
        # Older s3fs/botocore versions ignore AWS_ENDPOINT_URL by themselves.
        options["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open {url}: {type(exc).__name__}: {exc}") from None
    return fs, path


def describe_remote_error(url: str, exc: BaseException) -> str:
    """A reason for a failed remote call: the URL and the error, never a credential."""
    text = str(exc)
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return f"access denied for {url} (check the credentials): {type(exc).__name__}"
    if isinstance(exc, FileNotFoundError):
        return f"not found: {url}"
    return f"cannot read {url}: {type(exc).__name__}: {text[:200]}"


@dataclass(frozen=True)
class RemoteInfo:
    size: int
    version: str
    """ETag or modification time: changes when the object does."""


def remote_info(url: str) -> RemoteInfo:
    fs, path = filesystem(url)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{url} is a folder")
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return RemoteInfo(int(info["size"]), str(version or ""))


def list_remote(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files directly in a remote folder whose names end with ``suffixes``, sorted."""
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0]
    names = sorted(name for name in fs.ls(path, detail=False) if name.endswith(suffixes))
    return [f"{protocol}://{name}" for name in names]


class FileCache:
    """Remote files kept whole in ``folder``, at most ``max_bytes`` in all (see module doc)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)

    def entry(self, url: str) -> Path:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return self.folder / f"{digest}-{os.path.basename(url)[:80]}"

    def get(self, url: str, size: int) -> Path:
        """The local copy of ``url`` (``size`` bytes), downloaded if missing; marks it used."""
        if size > self.max_bytes:
            raise ValueError(
                f"{url} is {size} bytes, more than the whole cache ({self.max_bytes} bytes)"
            )
        path = self.entry(url)
        if self._touch(path):
            return path
        with _locked(path.with_name(path.name + ".lock")):
            if self._touch(path):  # another worker fetched it while we waited
                return path
            temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
            with _locked(self.folder / ".evict.lock"):
                self._evict(size, keep=path)
                # Sized up front: the reservation counts towards the bound at once.
                with open(temporary, "wb") as handle:
                    handle.truncate(size)
            try:
                self._download(url, temporary, size)
                os.replace(temporary, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    temporary.unlink()
        return path

    def _touch(self, path: Path) -> bool:
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def _download(self, url: str, temporary: Path, size: int) -> None:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as source, open(temporary, "r+b") as target:
            while block := source.read(8 << 20):
                target.write(block)
            if target.tell() != size:
                raise OSError(f"{url}: got {target.tell()} bytes, expected {size}")

    def _evict(self, incoming: int, keep: Path) -> None:
        """Deletes least recently used entries until ``incoming`` more bytes fit."""
        entries = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".lock") or not entry.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = entry.stat()
                entries.append((stat.st_mtime, entry.path, stat.st_size))
        total = sum(size for _, _, size in entries)
        for _, name, size in sorted(entries):
            if total + incoming <= self.max_bytes:
                break
            if name == str(keep) or _in_flight(name):
                continue  # its owner renames or deletes it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
                total -= size

    def usage(self) -> int:
        return sum(
            entry.stat().st_size
            for entry in os.scandir(self.folder)
            if entry.is_file() and not entry.name.endswith(".lock")
        )


def _in_flight(name: str) -> bool:
    """A temporary download whose process still runs (one left by a crashed worker is not)."""
    _, tmp, pid = os.path.basename(name).rpartition(".tmp")
    if not tmp or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_from(table: Table, needed: bool) -> FileCache | None:
    """The ``cache_dir`` / ``cache_bytes`` keys; ``cache_dir`` is required for remote files."""
    folder = table.path("cache_dir", None, must_exist=False)
    max_bytes = table.positive_int("cache_bytes", DEFAULT_CACHE_BYTES)
    if folder is None:
        if needed:
            raise table.error("cache_dir", "required for remote files (a local folder)")
        return None
    try:
        return FileCache(folder, max_bytes)
    except OSError as exc:
        raise table.error("cache_dir", f"cannot create {folder}: {exc}") from None


def resolve(table: Table, location: str) -> str:
    """A URL as given, or a local path relative to the config file's folder."""
    if is_url(location):
        return location
    return str((table.file.parent / location.removeprefix("file://")).resolve())
