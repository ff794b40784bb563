"""Issue 15: one same-host trainer, batches over shared memory vs bytes over gRPC, same run.

    python benchmarks/shm_throughput.py [--duration 6] [--repeats 2] [--quick]

One ``RemoteDataset`` (one stream) iterates a ``_datasets:repeating`` dataset
(workers only collate and write to shared memory, as in wire_throughput.py) of
each shape for ``--duration`` seconds after a warm-up, with ``transport="shm"``
and ``transport="grpc"`` alternately, against one server with 2 workers. It
reports delivered GB/s and batches/s (payload bytes the trainer received),
the median of the repeats.
"""

from __future__ import annotations

import statistics
import time

import _harness as h

from batchwire.client import RemoteDataset

SHAPES = ["mnist", "cifar", "imagenet", "big"]


def _nbytes(batch: object) -> int:
    if isinstance(batch, dict):
        return sum(_nbytes(value) for value in batch.values())
    if isinstance(batch, list | tuple):
        return sum(_nbytes(value) for value in batch)
    return batch.numel() * batch.element_size()  # type: ignore[attr-defined]


def measure(
    target: str, dataset: str, batch_size: int, transport: str, limit: int | None, **timing: float
) -> dict:
    ds = RemoteDataset(target, dataset, batch_size=batch_size, transport=transport)
    assert ds.transport == transport, f"asked {transport}, got {ds.transport}"
    batches = payload = 0
    started = None
    warm_until = time.perf_counter() + timing["warmup"]
    for batch in ds:
        now = time.perf_counter()
        if started is None:
            if now < warm_until:
                continue
            started = now
        batches += 1
        payload += _nbytes(batch)
        if (limit is not None and batches >= limit) or now - started >= timing["duration"]:
            break
    seconds = time.perf_counter() - (started or time.perf_counter())
    return {"batches_per_s": batches / seconds, "gb_per_s": payload / seconds / 1e9}


def main() -> None:
    args = h.arguments(__doc__.splitlines()[0], duration=6.0, repeats=2).parse_args()
    duration, warmup, repeats = h.timing(args)
    shapes = SHAPES[:2] if args.quick else SHAPES
    datasets = [
        h.dataset_toml(name, h.SHAPES[name][1], h.SHAPES[name][2], source="python", length=1 << 24)
        for name in shapes
    ]
    runs: dict[tuple[str, str], list[dict]] = {}
    with h.Server(h.server_toml(datasets, chunk_bytes=4 << 20), workers=2) as server:
        for _ in range(repeats):
            for name in shapes:
                for transport in ("shm", "grpc"):
                    run = measure(
                        server.target,
                        name,
                        h.SHAPES[name][0],
                        transport,
                        h.stop_after(args),
                        duration=duration,
                        warmup=warmup,
                    )
                    runs.setdefault((name, transport), []).append(run)
    rows, results = [], {}
    for name in shapes:
        result = {}
        for transport in ("shm", "grpc"):
            got = runs[(name, transport)]
            result[transport] = {key: statistics.median(run[key] for run in got) for key in got[0]}
        result["speedup"] = result["shm"]["gb_per_s"] / result["grpc"]["gb_per_s"]
        results[name] = result
        rows.append(
            [
                name,
                result["shm"]["gb_per_s"],
                result["shm"]["batches_per_s"],
                result["grpc"]["gb_per_s"],
                result["grpc"]["batches_per_s"],
                result["speedup"],
            ]
        )
    print(
        h.table(
            "one same-host trainer: shared memory vs gRPC bytes (2 workers, one stream)",
            ["shape", "shm GB/s", "shm batches/s", "grpc GB/s", "grpc batches/s", "shm/grpc"],
            rows,
        )
    )
    h.write_json("shm_throughput", args, results)


if __name__ == "__main__":
    main()
