"""Target 6: server memory stays bounded with a slow consumer and returns to baseline after.

    python benchmarks/memory.py [--batches 30] [--quick]

imagenet batches (9.6 MB) from a no-work dataset; a consumer in its own
process reads one batch per second. The resident memory of the server's gRPC
process and of its whole tree (workers included) is sampled every 0.5 s:
before the stream (baseline), while it runs, and after it ends. Bounded means
no growth between the first and the second half of the stream, and at most
``prefetch_batches`` batches' worth above baseline; "returns" means within one
batch of baseline a few seconds after the stream ends.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import _harness as h


def consume(target: str, batches: int, batch_size: int) -> None:
    from batchwire.client import RemoteDataset

    dataset = RemoteDataset(target, "imagenet", batch_size=batch_size)
    for count, _ in enumerate(dataset, start=1):
        if count >= batches:
            return
        time.sleep(1.0)  # a slow trainer: one batch a second


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="batches consumed, one a second")
    args = parser.parse_args()
    batches = 4 if args.quick else args.batches
    settle = 1.0 if args.quick else 4.0
    batch_size, shape, dtype = h.SHAPES["imagenet"]
    batch_mb = batch_size * (3 * 224 * 224 + 8) / 1e6
    prefetch = 4
    datasets = [h.dataset_toml("imagenet", shape, dtype, source="python", length=1 << 20)]
    samples: list[dict] = []
    with h.Server(h.server_toml(datasets, prefetch_batches=prefetch), workers=2) as server:

        def sample(phase: str) -> None:
            rss = server.rss_bytes()
            samples.append({"t": time.monotonic(), "phase": phase, **rss})

        for _ in range(4):
            sample("before")
            time.sleep(0.25)
        consumer = mp.get_context("spawn").Process(
            target=consume, args=(server.target, batches, batch_size)
        )
        consumer.start()
        while consumer.is_alive():
            sample("during")
            time.sleep(0.5)
        end = time.monotonic()
        while time.monotonic() - end < settle:
            sample("after")
            time.sleep(0.5)
        consumer.join()
    mb = {
        key: lambda phase, key=key: [s[key] / 1e6 for s in samples if s["phase"] == phase]
        for key in ("server", "tree")
    }
    rows, results = [], {}
    for key in ("server", "tree"):
        before, during, after = mb[key]("before"), mb[key]("during"), mb[key]("after")
        half = len(during) // 2
        first, second = during[1:half] or during, during[half:] or during
        results[key] = {
            "baseline_mb": statistics.median(before),
            "max_during_mb": max(during),
            "first_half_median_mb": statistics.median(first),
            "second_half_median_mb": statistics.median(second),
            "growth_mb": statistics.median(second) - statistics.median(first),
            "after_mb": after[-1],
            "after_minus_baseline_mb": after[-1] - statistics.median(before),
        }
        r = results[key]
        rows.append(
            [
                "gRPC process" if key == "server" else "whole tree",
                r["baseline_mb"],
                r["max_during_mb"],
                r["growth_mb"],
                r["after_mb"],
                r["after_minus_baseline_mb"],
            ]
        )
    print(
        h.table(
            f"server RSS (MB), consumer of {batches} batches at 1 batch/s; one batch is "
            f"{batch_mb:.1f} MB, prefetch_batches={prefetch}",
            ["process", "baseline", "max during", "growth 2nd-1st half", "after", "after-baseline"],
            rows,
        )
    )
    h.write_json(
        "memory",
        args,
        {
            "batches": batches,
            "batch_mb": batch_mb,
            "prefetch_batches": prefetch,
            "results": results,
            "samples": samples,
        },
    )


if __name__ == "__main__":
    main()
