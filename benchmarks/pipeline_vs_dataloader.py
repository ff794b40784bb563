"""Target 4: a CPU-bound image pipeline through batchwire vs a local DataLoader.

    python benchmarks/pipeline_vs_dataloader.py [--workers 2] [--images 640] [--quick]

An ``image_folder`` of generated JPEGs (256 x 256) with JPEG decode, random
crop 224, random flip and normalize. batchwire: a server with W workers, one
client streaming. Baseline in the same run: ``DataLoader(num_workers=W)`` on
the same machine over the very same pipeline (batchwire's ``Pipeline.load``,
so decode and transforms are the same code). Target: batchwire >= 0.9 x local.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import _harness as h
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

CONFIG = """
[datasets.images]
source = "image_folder"
root = "{root}"
transforms.image = [
  "ToTensor",
  {{ name = "RandomCrop", size = {crop} }},
  {{ name = "RandomHorizontalFlip", p = 0.5 }},
  {{ name = "Normalize", mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }},
]
"""


def make_images(root: Path, count: int, size: int) -> None:
    """Photo-like JPEGs: smooth colour fields plus noise, quality 90, in 10 classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((32, 32, 1), dtype=np.uint8))
        image = np.clip(image + rng.integers(0, 24, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)


class Local(Dataset):
    """batchwire's pipeline as a plain map-style dataset (seed 0, epoch 0)."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.pipeline)

    def __getitem__(self, index: int):
        return self.pipeline.load(index, seed=0, epoch=0)


def local_rate(
    config_path: Path,
    workers: int,
    batch_size: int,
    duration: float,
    warmup: float,
    batches: int | None = None,
) -> float:
    """Samples/s of the local DataLoader after ``warmup`` s, over ``duration`` s (or
    ``batches`` batches)."""
    from batchwire.server.config import load_config
    from batchwire.server.pipeline import build_pipeline

    config = load_config(config_path)
    pipeline = build_pipeline(config.datasets["images"], config.file, for_sampling=False)
    loader = DataLoader(
        Local(pipeline),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=pipeline.collate_fn,
        persistent_workers=True,
        prefetch_factor=2,
    )
    samples, measured, started, measuring = 0, 0, time.monotonic(), None
    while True:
        for batch in loader:
            now = time.monotonic()
            if measuring is None:
                if now - started >= warmup:
                    measuring = now
                continue
            samples += len(batch[1])
            measured += 1
            if measured == batches or (batches is None and now - measuring >= duration):
                return samples / (now - measuring)


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=8.0, repeats=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    duration, warmup, repeats = h.timing(args)
    count, size, crop = (64, 64, 56) if args.quick else (args.images, 256, 224)
    batch_size = min(args.batch_size, 16) if args.quick else args.batch_size
    folder = Path(tempfile.mkdtemp(prefix="batchwire-images-"))
    try:
        make_images(folder / "images", count, size)
        config = folder / "images.toml"
        config.write_text(CONFIG.format(root=folder / "images", crop=crop))
        torch.set_num_threads(1)
        local_runs, remote_runs = [], []
        for _ in range(repeats):  # interleaved
            local_runs.append(
                local_rate(config, args.workers, batch_size, duration, warmup, h.stop_after(args))
            )
            with h.Server(config.read_text(), workers=args.workers) as server:
                report = h.bench(
                    server,
                    "images",
                    batch_size,
                    duration=duration,
                    warmup=warmup,
                    batches=h.stop_after(args),
                )
            remote_runs.append(report["samples_per_s"])
        local, remote = (
            sorted(local_runs)[len(local_runs) // 2],
            sorted(remote_runs)[len(remote_runs) // 2],
        )
        print(
            h.table(
                f"JPEG {size}px decode + crop {crop} + flip + normalize, W={args.workers}, "
                f"batch {batch_size}, {duration:g} s (median of {repeats})",
                ["pipeline", "samples/s", "x local"],
                [
                    [f"DataLoader(num_workers={args.workers})", local, 1.0],
                    [f"batchwire, {args.workers} workers", remote, remote / local],
                ],
            )
        )
        h.write_json(
            "pipeline_vs_dataloader",
            args,
            {
                "workers": args.workers,
                "images": count,
                "image_size": size,
                "batch_size": batch_size,
                "duration_s": duration,
                "local_samples_per_s": local_runs,
                "batchwire_samples_per_s": remote_runs,
                "ratio": remote / local,
                "target": 0.9,
            },
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
