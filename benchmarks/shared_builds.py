"""Issue 13 (point 4, acceptance 5): eight identical trainers share each build.

    python benchmarks/shared_builds.py [--batches 24] [--repeats 3] [--quick]

A hyperparameter sweep: eight trainers stream the same build-bound dataset
(JPEG decode of 512 x 512 photos, random crop 448, resize 64, flip,
normalize; batch 16) from one server with W workers. Side by side in the same
run, against the same server: eight trainers with the same request (seed 0:
the server builds each batch once and sends it to all eight) and eight with
different seeds (seeds 1..8: nothing to share, each batch built for one).
Each trainer is its own process and reads ``--batches`` batches, then stops;
aggregate batches/s = 8 x batches / (first start to last finish). Count-bounded,
never time-bounded. Target: identical >= 4 x different seeds.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as h

TRAINERS = 8
QUICK_TRAINERS = 2  # the smoke run: each trainer process imports torch (seconds of CPU)
CONFIG = """
[datasets.photos]
source = "image_folder"
root = "{root}"
transforms.image = [
  {{ name = "RandomCrop", size = {crop} }},
  {{ name = "Resize", size = {out} }},
  {{ name = "RandomHorizontalFlip", p = 0.5 }},
  "ToTensor",
  {{ name = "Normalize", mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }},
]
"""


def _trainer(target: str, jobs, out) -> None:
    """One trainer process: for each job, ``batches`` batches of one epoch from ``start_at``."""
    from batchwire.client import RemoteDataset

    while (job := jobs.get()) is not None:
        seed, epoch, batches, batch_size, start_at = job
        dataset = RemoteDataset(target, "photos", batch_size=batch_size, shuffle=True, seed=seed)
        dataset.set_epoch(epoch)
        while time.monotonic() < start_at:  # CLOCK_MONOTONIC: one clock for all processes
            time.sleep(0.001)
        count, stream = 0, iter(dataset)
        for _ in stream:
            count += 1
            if count == batches:
                break
        stream.close()
        out.put((start_at, time.monotonic(), count))


class Trainers:
    """``count`` trainer processes (spawned once: each imports torch once)."""

    def __init__(self, target: str, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(count)]
        self.procs = [
            ctx.Process(target=_trainer, args=(target, jobs, self.out), daemon=True)
            for jobs in self.jobs
        ]
        for proc in self.procs:
            proc.start()

    def sweep(self, seeds: list[int], epoch: int, batches: int, batch_size: int) -> float:
        """Aggregate batches/s of one trainer per seed, all starting together."""
        start_at = time.monotonic() + 2.0
        for jobs, seed in zip(self.jobs, seeds, strict=False):
            jobs.put((seed, epoch, batches, batch_size, start_at))
        results = [self.out.get(timeout=900) for _ in seeds]
        if any(count != batches for _, _, count in results):
            raise RuntimeError(f"a trainer got fewer than {batches} batches: {results}")
        span = max(end for _, end, _ in results) - start_at
        return len(seeds) * batches / span

    def close(self) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples on the server's metrics endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=24, help="batches per trainer")
    args = parser.parse_args()
    _, _, repeats = h.timing(args)
    from pipeline_vs_dataloader import make_images

    size, crop, out, batch_size = (128, 112, 32, 8) if args.quick else (512, 448, 64, 16)
    batches = 4 if args.quick else args.batches
    n = QUICK_TRAINERS if args.quick else TRAINERS
    count = batch_size * batches
    folder = Path(tempfile.mkdtemp(prefix="batchwire-shared-"))
    try:
        make_images(folder / "photos", count, size)
        datasets = CONFIG.format(root=folder / "photos", crop=crop, out=out)
        metrics_port = h.free_port()
        text = h.server_toml([datasets], workers=args.workers, metrics_port=metrics_port)
        runs: dict[str, list[float]] = {"identical": [], "different seeds": []}
        shared: dict[str, list[float]] = {"identical": [], "different seeds": []}
        with h.Server(text, workers=args.workers) as server:
            trainers = Trainers(server.target, n)
            try:
                trainers.sweep([0], 0, min(batches, 4), batch_size)  # warm: imports, connections
                epoch = 1
                for repeat in range(repeats):  # interleaved, each order in turn
                    cases = [("identical", [0] * n), ("different seeds", [*range(1, n + 1)])]
                    for name, seeds in cases if repeat % 2 == 0 else cases[::-1]:
                        before = metric(metrics_port, "batchwire_shared_batches_total")
                        rate = trainers.sweep(seeds, epoch, batches, batch_size)
                        hits = metric(metrics_port, "batchwire_shared_batches_total") - before
                        runs[name].append(rate)
                        shared[name].append(hits)
                        print(f"{name}: {rate:.1f} batches/s, {hits:.0f} of {n * batches} shared")
                        epoch += 1
            finally:
                trainers.close()
        rate = {name: statistics.median(values) for name, values in runs.items()}
        ratio = rate["identical"] / rate["different seeds"]
        title = (
            f"{n} trainers, JPEG {size}px decode + crop {crop} + resize {out} + flip + "
            f"normalize, batch {batch_size}, {batches} batches each, W={args.workers} "
            f"(median of {repeats})"
        )
        rows = [
            [f"{n} x the same request (shared builds)", rate["identical"], ratio],
            [f"{n} x different seeds", rate["different seeds"], 1.0],
        ]
        print(h.table(title, ["trainers", "aggregate batches/s", "x"], rows))
        result: dict[str, Any] = {
            "trainers": n,
            "workers": args.workers,
            "image_size": size,
            "batch_size": batch_size,
            "batches_per_trainer": batches,
            "identical_batches_per_s": runs["identical"],
            "different_seeds_batches_per_s": runs["different seeds"],
            "identical_shared_batches": shared["identical"],
            "different_seeds_shared_batches": shared["different seeds"],
            "ratio": ratio,
            "target": 4.0,
        }
        h.write_json("shared_builds", args, result)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
