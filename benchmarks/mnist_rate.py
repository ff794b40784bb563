"""Target 2: mnist batches/s into one client, with 1..k parallel streams.

    python benchmarks/mnist_rate.py [--duration 8] [--streams 1,2,4,8] [--quick]

mnist is 64 x 784 float32 + int64 label (~200 KB a batch): small batches,
where round trips and per-batch overheads, not bandwidth, set the rate.
Parallel streams (``--streams k`` of ``batchwire bench``, ``RemoteDataset(streams=k)``)
keep k batches in flight. Baseline in the same run: a bare grpcio stream of
pre-built 200 KB messages (its messages/s is the ceiling of one stream).
"""

from __future__ import annotations

import _harness as h

TARGET = 4000.0


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=6.0)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    duration, warmup, _ = h.timing(args)
    counts = [2] if args.quick else [int(k) for k in args.streams.split(",")]
    batch_size, shape, dtype = h.SHAPES["mnist"]
    datasets = [
        h.dataset_toml("mnist", shape, dtype, source="python", length=1 << 20),
        h.dataset_toml("mnist_synthetic", shape, dtype, source="synthetic", length=1 << 20),
    ]
    batch_bytes = batch_size * (784 * 4 + 8)
    bare = h.bare_grpc(batch_bytes, duration, tuned=True, messages=h.stop_after(args))
    bare /= batch_bytes
    rows, results = [], {}
    with h.Server(h.server_toml(datasets), workers=args.workers) as server:
        for dataset in ("mnist",) if args.quick else ("mnist", "mnist_synthetic"):
            for k in counts:
                report = h.bench(
                    server,
                    dataset,
                    batch_size,
                    duration=duration,
                    warmup=warmup,
                    batches=h.stop_after(args),
                    streams=k,
                )
                rate = report["batches_per_s"]
                results[f"{dataset}/streams={k}"] = {
                    "dataset": dataset,
                    "streams": k,
                    "batches_per_s": rate,
                    "batches_per_s_per_stream": rate / k,
                    "mb_per_s": report["mb_per_s"],
                    "latency_p50_s": report["latency_s"]["p50"],
                    "latency_p99_s": report["latency_s"]["p99"],
                    "cpu_seconds_per_gb": report["cpu_seconds_per_gb"],
                    "ratio_target": rate / TARGET,
                    "ratio_bare_grpc": rate / bare,
                }
                cpu = report["cpu_seconds_per_gb"]
                per_batch_ms = {
                    key: value * batch_bytes / 1e9 * 1e3 for key, value in cpu.items()
                }  # CPU ms per batch
                rows.append(
                    [
                        dataset,
                        k,
                        rate,
                        rate / k,
                        rate / TARGET,
                        report["latency_s"]["p50"] * 1e3,
                        per_batch_ms["server"],
                        per_batch_ms["workers"],
                        per_batch_ms["clients"],
                    ]
                )
    print(
        h.table(
            f"mnist batches/s into one client ({duration:g} s); target {TARGET:,.0f}; "
            f"bare grpcio stream of 200 KB messages: {bare:,.0f} msg/s",
            [
                "dataset",
                "streams",
                "batches/s",
                "per stream",
                "x target",
                "p50 ms",
                "cpu ms/batch srv",
                "workers",
                "client",
            ],
            rows,
        )
    )
    h.write_json(
        "mnist_rate",
        args,
        {
            "duration_s": duration,
            "target_batches_per_s": TARGET,
            "bare_grpc_messages_per_s": bare,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
