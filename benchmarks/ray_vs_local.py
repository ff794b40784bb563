"""Issue 14: the Ray executor vs the local worker pool, same machine, same run.

    python benchmarks/ray_vs_local.py [--repeats 3] [--quick]

Runs itself inside a network namespace with only ``lo`` (as root: ``unshare
-n``), so Ray finds 127.0.0.1 and nothing leaves the machine. One stream at a
time through ``BatchStream`` (the server's scheduling, no gRPC), 2 workers
(processes, or actors of a local Ray with 2 CPUs), alternating local and ray.
Cases: build-bound (JPEG decode + random crop/flip/normalize of 64 x 64
images, batch 32) and byte-bound (pre-made 3 x 224 x 224 uint8 items, batch
64: 9.6 MB batches, nothing to compute but the collate).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _harness as h
import numpy as np

IMAGES = """
[datasets.images]
source = "image_folder"
root = "images"
transforms.image = [
  "ToTensor",
  { name = "RandomCrop", size = 56, padding = 4 },
  { name = "RandomHorizontalFlip", p = 0.5 },
  { name = "Normalize", mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] },
]
"""
CASES = {"build-bound (images, batch 32)": ("images", 32), "byte-bound (9.6 MB)": ("big", 64)}


def make_images(root: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")


async def one_stream(executor, dataset: str, batch_size: int, length: int) -> tuple[int, int]:
    from batchwire.server.samplers import BatchPlan
    from batchwire.server.stream import BatchStream, StreamHooks, StreamLimits

    sent = {"bytes": 0, "messages": 0}

    async def write(message: bytes) -> None:
        sent["bytes"] += len(message)
        sent["messages"] += 1

    # Random indices (with repeats) into the first 256 items: both datasets have them.
    plan = BatchPlan.fixed(np.random.default_rng(1).integers(0, 256, length), batch_size, True)
    limits = StreamLimits(prefetch_batches=4, chunk_bytes=4 << 20, max_batch_bytes=1 << 30)
    await BatchStream(
        executor, dataset, plan, range(len(plan)), limits, StreamHooks(write=write)
    ).run()
    return len(plan), sent["bytes"]


def measure(executor, dataset: str, batch_size: int, length: int) -> dict[str, float]:
    asyncio.run(one_stream(executor, dataset, batch_size, batch_size * 8))  # warm
    started = time.perf_counter()
    batches, size = asyncio.run(one_stream(executor, dataset, batch_size, length))
    seconds = time.perf_counter() - started
    return {"batches_per_s": batches / seconds, "mb_per_s": size / seconds / 1e6}


def inside(args) -> None:
    from batchwire.server.config import load_config
    from batchwire.server.local import LocalExecutor
    from batchwire.server.ray_executor import RayExecutor

    _, _, repeats = h.timing(args)
    length = 32 * 8 if args.quick else 32 * 240
    work = Path(tempfile.mkdtemp(prefix="bw-ray-bench-"))
    try:
        make_images(work / "images", 256)
        big = h.dataset_toml("big", [3, 224, 224], "uint8", source="python", length=1 << 20)
        config_text = h.server_toml([IMAGES, big], workers=2, ray_num_cpus=2)
        (work / "bench.toml").write_text(config_text)
        config = load_config(work / "bench.toml")
        # The local pool first: its forkserver must exist before ray.init (fork after it
        # can deadlock); both stay up and the runs alternate.
        local = LocalExecutor(config, 2)
        local.start()
        local.warm_up(["images", "big"])
        ray = RayExecutor(config, 2)
        ray.start()
        ray.warm_up(["images", "big"])
        runs: dict[str, dict[str, list[dict[str, float]]]] = {}
        for repeat in range(repeats):
            order = [("local", local), ("ray", ray)]
            order = order if repeat % 2 == 0 else order[::-1]
            for case, (dataset, batch_size) in CASES.items():
                n = length if dataset == "images" else (64 * 4 if args.quick else 64 * 120)
                for kind, executor in order:
                    result = measure(executor, dataset, batch_size, n)
                    runs.setdefault(case, {"local": [], "ray": []})[kind].append(result)
        ray.close()
        local.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows, results = [], {}
    for case, by_kind in runs.items():
        rate = {k: statistics.median(r["batches_per_s"] for r in v) for k, v in by_kind.items()}
        mb = {k: statistics.median(r["mb_per_s"] for r in v) for k, v in by_kind.items()}
        cost_ms = (1 / rate["ray"] - 1 / rate["local"]) * 1e3
        results[case] = {
            "batches_per_s": rate,
            "mb_per_s": mb,
            "runs": by_kind,
            "ray_extra_ms_per_batch": cost_ms,
        }
        rows.append(
            [
                case,
                rate["local"],
                rate["ray"],
                rate["ray"] / rate["local"],
                mb["local"],
                mb["ray"],
                cost_ms,
            ]
        )
    print(
        h.table(
            f"local pool vs ray, 2 workers, 1 stream, median of {repeats}",
            [
                "case",
                "local b/s",
                "ray b/s",
                "ray/local",
                "local MB/s",
                "ray MB/s",
                "ray extra ms/batch",
            ],
            rows,
        )
    )
    h.write_json("ray_vs_local", args, {"repeats": repeats, "results": results})


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], repeats=3)
    args = parser.parse_args()
    if h.in_loopback_netns():
        inside(args)
        return
    h.rerun_in_loopback_netns(
        __file__, {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    )


if __name__ == "__main__":
    main()
