"""``storage.FileCache`` across processes: one download per file, never a partial file, bounded."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from batchwire.server.sources import storage


class CountingCache(storage.FileCache):
    """Appends a line per download to ``downloads.log`` (in the test's folder)."""

    def _download(self, url: str, temporary: Path, size: int) -> None:
        with open(self.folder.parent / "downloads.log", "a") as log:
            log.write(url + "\n")
        super()._download(url, temporary, size)


def fetch(folder: str, url: str, size: int, bound: int, start) -> None:
    start.wait()
    path = CountingCache(Path(folder), bound).get(url, size)
    assert path.read_bytes() == Path(url.removeprefix("file://")).read_bytes()


def test_concurrent_workers_download_a_file_once(tmp_path):
    source = tmp_path / "shard.tar"
    source.write_bytes(os.urandom(3 << 20))
    context = multiprocessing.get_context("fork")
    start = context.Event()
    args = (str(tmp_path / "cache"), f"file://{source}", source.stat().st_size, 1 << 30, start)
    workers = [context.Process(target=fetch, args=args) for _ in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert (tmp_path / "downloads.log").read_text().count("\n") == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        storage.FileCache(tmp_path / "cache", 1).entry(args[1]).name
    ]


def test_least_recently_used_files_are_evicted_to_stay_under_the_bound(tmp_path):
    files = []
    for i in range(4):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]) * 1000)
    cache = storage.FileCache(tmp_path / "cache", 2500)
    urls = [f"file://{f}" for f in files]
    cache.get(urls[0], 1000)
    cache.get(urls[1], 1000)
    os.utime(cache.entry(urls[1]), (1, 1))  # f1 is now the least recently used
    cache.get(urls[0], 1000)
    cache.get(urls[2], 1000)
    assert cache.usage() <= 2500
    assert not cache.entry(urls[1]).exists() and cache.entry(urls[0]).exists()
    with pytest.raises(ValueError, match="more than the whole cache"):
        cache.get(urls[3], 3000)


def test_brace_patterns_expand_like_webdataset():
    assert storage.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert storage.expand_braces("{a,b}/x{8..10}") == [
        "a/x8",
        "a/x9",
        "a/x10",
        "b/x8",
        "b/x9",
        "b/x10",
    ]


def test_a_download_left_by_a_dead_worker_is_evicted(tmp_path):
    source = tmp_path / "f"
    source.write_bytes(b"x" * 1000)
    cache = storage.FileCache(tmp_path / "cache", 1500)
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    stale = tmp_path / "cache" / f"0123-other.tar.tmp{dead.pid}"
    stale.write_bytes(b"y" * 1000)  # a crashed download's reservation
    cache.get(f"file://{source}", 1000)
    assert not stale.exists() and cache.usage() == 1000
