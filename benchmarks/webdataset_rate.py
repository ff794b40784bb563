"""Issue 18: samples/s from WebDataset JPEG shards, local and through the s3:// cache.

    python benchmarks/webdataset_rate.py [--workers 2] [--shards 8] [--per-shard 80] [--quick]

Shards of generated JPEGs (256 x 256, quality 90) with a class label, decoded
to HWC uint8 (``image = "rgb8"``) and batched. Three rows, same run:

- the ``webdataset`` package's own loader, ``WebDataset(urls).decode("rgb8")
  .to_tuple("jpg", "cls")`` in a ``DataLoader(num_workers=W)`` (sequential
  reads, no random access: the reference rate);
- batchwire's ``webdataset`` source on the local shards, W workers, shuffled
  (random access through the member index);
- the same shards from ``s3://`` on a loopback S3 server (moto), read through
  the cache (warm: a first epoch fetched them).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
import numpy as np
import torch
from torch.utils.data import DataLoader

CONFIG = """
[datasets.local]
source = "webdataset"
shards = "{folder}/shard-{{000000..{last:06d}}}.tar"
fields = {{ image = "jpg", label = "cls" }}

[datasets.cached]
source = "webdataset"
shards = "s3://bench/shard-{{000000..{last:06d}}}.tar"
fields = {{ image = "jpg", label = "cls" }}
cache_dir = "{folder}/cache"
"""


def make_shards(folder: Path, shards: int, per_shard: int, size: int) -> list[Path]:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for shard in range(shards):
        paths.append(folder / f"shard-{shard:06d}.tar")
        with wds.TarWriter(str(paths[-1])) as sink:
            for i in range(per_shard):
                coarse = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
                image = np.kron(coarse, np.ones((32, 32, 1), dtype=np.uint8))
                image = np.clip(image + rng.integers(0, 24, image.shape), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG", quality=90)
                sink.write(
                    {"__key__": f"{shard:06d}-{i:05d}", "jpg": buffer.getvalue(), "cls": i % 10}
                )
    return paths


def package_rate(paths: list[Path], workers: int, batch_size: int, duration: float, warmup: float):
    """The webdataset package's loader: its own shard split across DataLoader workers."""
    import webdataset as wds

    dataset = (
        wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
        .decode("rgb8")
        .to_tuple("jpg", "cls")
        .batched(batch_size)
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True)
    samples, started, measuring = 0, time.monotonic(), None
    while True:
        for images, _ in loader:
            now = time.monotonic()
            if measuring is None:
                if now - started >= warmup:
                    measuring = now
                continue
            samples += len(images)
            if now - measuring >= duration:
                return samples / (now - measuring)


class Moto:
    """moto's S3 server on a free loopback port (nothing but 127.0.0.1 is reached)."""

    def __enter__(self) -> Moto:
        self.port = h.free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=self.endpoint,
            NO_PROXY="127.0.0.1",
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto did not start")

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def upload(self, paths: list[Path]) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        for path in paths:
            client.upload_file(str(path), "bench", path.name)


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=8.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    duration, warmup, _ = h.timing(args)
    shards, per_shard, size = (2, 16, 64) if args.quick else (args.shards, args.per_shard, 256)
    batch_size = min(args.batch_size, 8) if args.quick else args.batch_size
    folder = Path(tempfile.mkdtemp(prefix="batchwire-wds-"))
    try:
        paths = make_shards(folder, shards, per_shard, size)
        torch.set_num_threads(1)
        package = package_rate(paths, args.workers, batch_size, duration, warmup)
        with Moto() as moto:
            moto.upload(paths)
            config = CONFIG.format(folder=folder, last=shards - 1)
            rates = {}
            with h.Server(config, workers=args.workers) as server:
                for name in ("local", "cached"):
                    report = h.bench(
                        server, name, batch_size, duration=duration, warmup=warmup, shuffle=True
                    )
                    rates[name] = report["samples_per_s"]
        rows = [
            [f"webdataset package, DataLoader(num_workers={args.workers})", package, 1.0],
            ["batchwire webdataset, local shards", rates["local"], rates["local"] / package],
            ["batchwire webdataset, s3:// via cache", rates["cached"], rates["cached"] / package],
        ]
        print(
            h.table(
                f"WebDataset JPEG {size}px -> rgb8, {shards} x {per_shard} samples, "
                f"W={args.workers}, batch {batch_size}, {duration:g} s",
                ["reader", "samples/s", "x package"],
                rows,
            )
        )
        h.write_json(
            "webdataset_rate",
            args,
            {
                "workers": args.workers,
                "shards": shards,
                "per_shard": per_shard,
                "image_size": size,
                "batch_size": batch_size,
                "duration_s": duration,
                "package_samples_per_s": package,
                "local_samples_per_s": rates["local"],
                "cached_samples_per_s": rates["cached"],
            },
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
