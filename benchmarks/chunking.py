"""Target 3: big batches are not slower per byte than imagenet ones; the chunk size, measured.

    python benchmarks/chunking.py [--duration 5] [--chunks 1,4,16] [--quick]

``big`` (256 x 3 x 224 x 224 uint8, 38.5 MB) and ``imagenet`` (64 x ..., 9.6
MB) from no-work datasets, one client, one stream, for each ``chunk_bytes``
(MiB) in turn (a server per chunk size). The ratio big/imagenet in MB/s is the
target (>= 1); the sweep is the measurement behind the default chunk size.
A bare grpcio stream of pre-built messages of each size runs in the same
run: grpcio's own cost of large messages.
"""

from __future__ import annotations

import _harness as h


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=5.0)
    parser.add_argument("--chunks", default="1,4,16")
    args = parser.parse_args()
    duration, warmup, repeats = h.timing(args)
    chunks = [4] if args.quick else [int(c) for c in args.chunks.split(",")]
    datasets = []
    for name in ("imagenet", "big"):
        _, shape, dtype = h.SHAPES[name]
        datasets.append(h.dataset_toml(name, shape, dtype, source="python", length=1 << 20))
    rows, results = [], {}
    for mib in chunks:
        chunk = mib << 20
        bare = h.bare_grpc(chunk, duration, tuned=True, messages=h.stop_after(args))
        measured = {}
        with h.Server(h.server_toml(datasets, chunk_bytes=chunk), workers=2) as server:
            for name in ("imagenet", "big"):
                runs = [
                    h.bench(
                        server,
                        name,
                        h.SHAPES[name][0],
                        duration=duration,
                        warmup=warmup,
                        batches=h.stop_after(args),
                    )
                    for _ in range(repeats)
                ]
                measured[name] = h.best(runs)
        ratio = measured["big"]["mb_per_s"] / measured["imagenet"]["mb_per_s"]
        results[f"{mib}MiB"] = {
            "chunk_bytes": chunk,
            "imagenet_mb_per_s": measured["imagenet"]["mb_per_s"],
            "big_mb_per_s": measured["big"]["mb_per_s"],
            "big_over_imagenet": ratio,
            "bare_grpc_mb_per_s": bare / 1e6,
            "imagenet_latency_p50_s": measured["imagenet"]["latency_s"]["p50"],
            "big_latency_p50_s": measured["big"]["latency_s"]["p50"],
        }
        rows.append(
            [
                mib,
                measured["imagenet"]["mb_per_s"],
                measured["big"]["mb_per_s"],
                ratio,
                bare / 1e6,
            ]
        )
    print(
        h.table(
            f"big vs imagenet per byte, by chunk size ({duration:g} s, median of {repeats})",
            ["chunk MiB", "imagenet MB/s", "big MB/s", "big/imagenet", "bare grpc MB/s"],
            rows,
        )
    )
    h.write_json("chunking", args, {"duration_s": duration, "results": results})


if __name__ == "__main__":
    main()
