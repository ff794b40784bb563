"""Per-request compression: where lz4/zstd pay and where they do not.

    python benchmarks/compression_pays.py [--duration 6] [--quick]

imagenet-shaped uint8 batches, photo-like (``smooth``: compressible) and
uniform noise (incompressible), plus cifar float32 noise; for each codec the
loopback throughput (decoded MB/s), the bytes on the wire and the ratio. On
loopback the link is faster than any codec, so compression cannot win there;
the table also gives the rate each codec would deliver over a slower link,
``min(loopback rate, link rate x ratio)``, which is where it pays.
"""

from __future__ import annotations

import _harness as h

CODECS = ["none", "lz4", "zstd"]
LINKS_GBIT = [1, 10, 25]


def main() -> None:
    args = h.arguments(__doc__.splitlines()[0], duration=5.0).parse_args()
    duration, warmup, _ = h.timing(args)
    _, image, _ = h.SHAPES["imagenet"]
    cases = {
        "imagenet_smooth": ("imagenet", image, "uint8", "smooth"),
        "imagenet_noise": ("imagenet", image, "uint8", "noise"),
        "cifar_noise": ("cifar", h.SHAPES["cifar"][1], "float32", "noise"),
    }
    # As many distinct items as a batch holds: repeats inside a batch would let zstd's
    # window find them and report a ratio no real data has.
    datasets = [
        h.dataset_toml(
            name,
            shape,
            dtype,
            source="python",
            length=1 << 20,
            pattern=pattern,
            distinct=h.SHAPES[shape_name][0],
        )
        for name, (shape_name, shape, dtype, pattern) in cases.items()
    ]
    if args.quick:
        cases = {"imagenet_smooth": cases["imagenet_smooth"]}
    rows, results = [], {}
    with h.Server(h.server_toml(datasets), workers=2) as server:
        for name, (shape_name, *_) in cases.items():
            batch_size = h.SHAPES[shape_name][0]
            for codec in CODECS[:2] if args.quick else CODECS:
                report = h.bench(
                    server,
                    name,
                    batch_size,
                    duration=duration,
                    warmup=warmup,
                    batches=h.stop_after(args),
                    compression=codec,
                )
                ratio = report["bytes"] / max(report["wire_bytes"], 1)
                rate = report["mb_per_s"]
                over_link = {
                    f"{g}gbit": min(rate, g * 125 * ratio) for g in LINKS_GBIT
                }  # MB/s of decoded batches a link of g Gbit/s would deliver
                results[f"{name}/{codec}"] = {
                    "loopback_mb_per_s": rate,
                    "wire_mb_per_s": report["wire_mb_per_s"],
                    "ratio": ratio,
                    "modelled_mb_per_s_over_link": over_link,
                    "cpu_seconds_per_gb": report["cpu_seconds_per_gb"],
                }
                rows.append([name, codec, ratio, rate, *over_link.values()])
    print(
        h.table(
            f"compression ({duration:g} s per cell); decoded MB/s on loopback and modelled over links",
            ["data", "codec", "ratio", "loopback MB/s", *(f"{g} Gbit/s" for g in LINKS_GBIT)],
            rows,
        )
    )
    h.write_json("compression_pays", args, {"duration_s": duration, "results": results})


if __name__ == "__main__":
    main()
