"""Target 1: wire throughput of cifar, imagenet, big vs iperf3 and a bare grpcio stream.

    python benchmarks/wire_throughput.py [--duration 8] [--repeats 3] [--quick]

One client, one stream, server with 2 workers over loopback. Baselines in the
same run, interleaved with the batchwire runs: iperf3's loopback TCP, and a
bare grpcio stream of pre-built ``chunk_bytes`` messages (grpcio's default
options, and batchwire's). ``nowork`` datasets cost the worker only the
collate and the write to shared memory (as the tf.data-service figures' worker
doing no work); ``synthetic`` ones draw every sample from an RNG, as the
built-in source does.
"""

from __future__ import annotations

import statistics

import _harness as h

SHAPES = ["cifar", "imagenet", "big"]
CHUNK_BYTES = 4 << 20


def main() -> None:
    args = h.arguments(__doc__.splitlines()[0], duration=6.0, repeats=2).parse_args()
    duration, warmup, repeats = h.timing(args)
    shapes = SHAPES[:1] if args.quick else SHAPES
    datasets = []
    for name in shapes:
        _, shape, dtype = h.SHAPES[name]
        datasets.append(h.dataset_toml(name, shape, dtype, source="python", length=1 << 20))
        datasets.append(
            h.dataset_toml(f"{name}_synthetic", shape, dtype, source="synthetic", length=1 << 20)
        )
    runs: dict[str, list[float]] = {"iperf3": [], "bare_default": [], "bare_tuned": []}
    reports: dict[str, list[dict]] = {}
    with h.Server(h.server_toml(datasets, chunk_bytes=CHUNK_BYTES), workers=2) as server:
        for _ in range(repeats):
            speed = h.iperf3(duration)
            if speed is not None:
                runs["iperf3"].append(speed)
            for tuned in (False, True):
                runs["bare_tuned" if tuned else "bare_default"].append(
                    h.bare_grpc(CHUNK_BYTES, duration, tuned=tuned, messages=h.stop_after(args))
                )
            for name in shapes:
                batch_size = h.SHAPES[name][0]
                for variant in (name,) if args.quick else (name, f"{name}_synthetic"):
                    report = h.bench(
                        server,
                        variant,
                        batch_size,
                        duration=duration,
                        warmup=warmup,
                        batches=h.stop_after(args),
                    )
                    reports.setdefault(variant, []).append(report)
    base = {k: statistics.median(v) if v else None for k, v in runs.items()}
    rows, results = [], {}
    for name in shapes:
        fast = h.best(reports[name])
        slow = h.best(reports.get(f"{name}_synthetic") or reports[name])
        rate = fast["mb_per_s"] * 1e6
        cpu = fast["cpu_seconds_per_gb"]
        results[name] = {
            "gb_per_s": rate / 1e9,
            "all_gb_per_s": [r["mb_per_s"] / 1e3 for r in reports[name]],
            "synthetic_gb_per_s": slow["mb_per_s"] / 1e3,
            "ratio_iperf3": rate / base["iperf3"] if base["iperf3"] else None,
            "ratio_bare_default": rate / base["bare_default"],
            "ratio_bare_tuned": rate / base["bare_tuned"],
            "batches_per_s": fast["batches_per_s"],
            "latency_p50_s": fast["latency_s"]["p50"],
            "cpu_seconds_per_gb": cpu,
            "synthetic_cpu_seconds_per_gb": slow["cpu_seconds_per_gb"],
        }
        rows.append(
            [
                name,
                rate / 1e9,
                results[name]["ratio_iperf3"],
                results[name]["ratio_bare_default"],
                results[name]["ratio_bare_tuned"],
                slow["mb_per_s"] / 1e3,
                cpu["server"],
                cpu["workers"],
                cpu["clients"],
            ]
        )
    print(
        h.table(
            f"wire throughput, 1 client, {duration:g} s x {repeats} (median); baselines (GB/s): "
            + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in base.items() if v),
            [
                "shape",
                "GB/s",
                "x iperf3",
                "x bare grpc",
                "x bare tuned",
                "synthetic GB/s",
                "cpu s/GB srv",
                "workers",
                "client",
            ],
            rows,
        )
    )
    if base["iperf3"] is None:
        print("iperf3 not installed (apt-get install iperf3): that baseline was skipped")
    h.write_json(
        "wire_throughput",
        args,
        {
            "duration_s": duration,
            "repeats": repeats,
            "chunk_bytes": CHUNK_BYTES,
            "baselines_bytes_per_s": base,
            "baseline_runs_bytes_per_s": runs,
            "results": results,
            "target": "gb_per_s >= 0.75 x iperf3",
        },
    )


if __name__ == "__main__":
    main()
