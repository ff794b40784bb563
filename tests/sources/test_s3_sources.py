"""Sources reading ``s3://`` from a real S3-compatible server on loopback (moto), through the cache."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _serverproc import ServerProcess, batchwire_command
from conftest import assert_same_batch
from s3server import DUMMY_CREDENTIALS, MotoServer
from sources_data import make_parquet, make_shards

from batchwire.client import RemoteDataset

SHARDS, PER_SHARD = 4, 6

CONFIG = """
[datasets.local]
source = "webdataset"
shards = "data/shard-{{000000..000003}}.tar"
fields = {{ image = "jpg", label = "cls", vector = "npy" }}

[datasets.remote]
source = "webdataset"
shards = "s3://shards/train/shard-{{000000..000003}}.tar"
fields = {{ image = "jpg", label = "cls", vector = "npy" }}
cache_dir = "{cache}"
cache_bytes = {cache_bytes}

[datasets.local_table]
source = "parquet"
path = "table"
fields = ["x", "grid", "label", "png", "hf_image"]
images = ["png"]

[datasets.local_arrays]
source = "arrays"
files = {{ x = "arrays/x.npy", y = "arrays/y.npy" }}

[datasets.remote_arrays]
source = "arrays"
files = {{ x = "s3://shards/arrays/x.npy", y = "s3://shards/arrays/y.npy" }}
cache_dir = "{cache}-arrays"

[datasets.remote_table]
source = "parquet"
path = "s3://shards/table"
fields = ["x", "grid", "label", "png", "hf_image"]
images = ["png"]
cache_dir = "{cache}-table"
"""


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, moto: MotoServer) -> Path:
    folder = tmp_path_factory.mktemp("s3")
    shards = make_shards(folder / "data", SHARDS, PER_SHARD)
    moto.upload("shards", shards, "train")
    moto.upload("shards", make_parquet(folder / "table", 2, 5), "table")
    (folder / "arrays").mkdir()
    rng = np.random.default_rng(1)
    np.save(folder / "arrays" / "x.npy", rng.standard_normal((21, 3)).astype(np.float32))
    np.save(folder / "arrays" / "y.npy", rng.integers(0, 5, 21))
    moto.upload("shards", [folder / "arrays" / "x.npy", folder / "arrays" / "y.npy"], "arrays")
    return folder


def write_config(folder: Path, name: str, cache: str, cache_bytes: int) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(CONFIG.format(cache=cache, cache_bytes=cache_bytes))
    return path


def shard_bytes(folder: Path) -> list[int]:
    return [p.stat().st_size for p in sorted((folder / "data").glob("*.tar"))]


def epoch(target: str, name: str, number: int) -> list:
    remote = RemoteDataset(target, name, batch_size=4, shuffle=True, seed=3)
    remote.set_epoch(number)
    return list(remote)


def test_s3_streams_equal_the_local_copies(folder, moto):
    config = write_config(folder, "roomy", "cache-roomy", 1 << 30)
    with ServerProcess(config, workers=2, env=moto.env) as server:
        pairs = [
            ("local", "remote"),
            ("local_table", "remote_table"),
            ("local_arrays", "remote_arrays"),
        ]
        for local, remote in pairs:
            expected, actual = epoch(server.target, local, 0), epoch(server.target, remote, 0)
            assert len(actual) == len(expected) > 0
            for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
                assert_same_batch(a, e, f"{remote} batch {i}")
    cached = {
        p.name.split("-", 1)[1]: p.read_bytes() for p in (folder / "cache-roomy").glob("*.tar")
    }
    assert sorted(cached) == [f"shard-{i:06d}.tar" for i in range(SHARDS)]
    for name, data in cached.items():
        assert data == (folder / "data" / name).read_bytes()  # byte-identical downloads


def test_cache_stays_under_its_bound_over_three_epochs(folder, moto):
    sizes = shard_bytes(folder)
    bound = max(sizes) * 2 + max(sizes) // 2  # two and a half shards of four
    assert bound < sum(sizes)
    config = write_config(folder, "tight", "cache-tight", bound)
    cache = folder / "cache-tight"
    peak, stop = [0], threading.Event()

    def watch() -> None:  # samples the folder while workers download and evict
        while not stop.is_set():
            usage = (
                sum(
                    p.stat().st_size
                    for p in cache.glob("*")
                    if p.is_file() and not p.name.endswith(".lock")
                )
                if cache.exists()
                else 0
            )
            peak[0] = max(peak[0], usage)
            stop.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ServerProcess(config, workers=2, env=moto.env) as server:
            expected = [epoch(server.target, "local", n) for n in range(3)]
            for n in range(3):
                actual = epoch(server.target, "remote", n)
                assert len(actual) == len(expected[n]) == 6
                for i, (a, e) in enumerate(zip(actual, expected[n], strict=True)):
                    assert_same_batch(a, e, f"epoch {n} batch {i}")
    finally:
        stop.set()
        watcher.join()
    assert 0 < peak[0] <= bound, f"cache held {peak[0]} bytes, bound {bound}"
    assert len(list(cache.glob("*.tar"))) <= 2  # shards were evicted to make room


def test_two_servers_sharing_the_bucket_and_cache_both_serve(folder, moto):
    config = write_config(folder, "shared", "cache-shared", 1 << 30)
    with (
        ServerProcess(config, workers=2, env=moto.env) as first,
        ServerProcess(config, workers=2, env=moto.env) as second,
    ):
        a, b = epoch(first.target, "remote", 1), epoch(second.target, "remote", 1)
        assert len(a) == len(b) == 6
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_batch(x, y, f"batch {i}")
    assert len(list((folder / "cache-shared").glob("*.tar"))) == SHARDS  # each fetched once


def serve_error(config: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    return result.stderr


def test_missing_remote_shard_fails_at_start_up(folder, moto):
    import os

    config = folder / "missing.toml"
    config.write_text(
        '[datasets.r]\nsource = "webdataset"\nshards = "s3://shards/train/shard-{000003..000004}.tar"\n'
        'fields = ["cls"]\ncache_dir = "cache-missing"\n'
    )
    error = serve_error(config, {**os.environ, **moto.env})
    assert (
        f"{config}: datasets.r.shards: shard not found: s3://shards/train/shard-000004.tar" in error
    )


def test_a_cache_smaller_than_a_shard_fails_at_start_up(folder, moto):
    import os

    config = folder / "small.toml"
    config.write_text(
        '[datasets.r]\nsource = "webdataset"\nshards = "s3://shards/train/shard-000000.tar"\n'
        'fields = ["cls"]\ncache_dir = "cache-small"\ncache_bytes = 1000\n'
    )
    error = serve_error(config, {**os.environ, **moto.env})
    assert "datasets.r.cache_bytes: s3://shards/train/shard-000000.tar is" in error
    assert "the cache must hold the largest shard" in error


def test_refused_credentials_fail_at_start_up_without_leaking_them(tmp_path):
    import os

    with MotoServer(require_auth=True) as strict:
        config = tmp_path / "auth.toml"
        config.write_text(
            '[datasets.r]\nsource = "webdataset"\nshards = "s3://shards/train/shard-000000.tar"\n'
            'fields = ["cls"]\ncache_dir = "cache"\n'
        )
        error = serve_error(config, {**os.environ, **strict.env})
    assert "datasets.r.shards: access denied for s3://shards/train/shard-000000.tar" in error
    assert DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in error
    assert DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"] not in error
