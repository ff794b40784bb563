"""grpcio's own CPU cost per message and per GB: a bare stream of pre-built bytes.

    python benchmarks/grpc_cost.py [--duration 4] [--sizes 204800,1048576,4194304] [--quick]

The floor under target 1 and 2: whatever batchwire does, its server and
client pay at least this for the bytes they move through grpcio. Server CPU
from /proc, client CPU from ``getrusage`` (this process only receives).
"""

from __future__ import annotations

import _harness as h


def measure(size: int, seconds: float, messages: int | None) -> dict[str, float]:
    run = h.bare_grpc_run(size, seconds, tuned=True, messages=messages)
    messages, gigabytes = run["messages"], run["messages"] * size / 1e9
    return {
        "message_bytes": size,
        "messages_per_s": messages / run["seconds"],
        "gb_per_s": run["bytes_per_s"] / 1e9,
        "server_us_per_message": run["server_cpu_seconds"] / messages * 1e6,
        "client_us_per_message": run["client_cpu_seconds"] / messages * 1e6,
        "server_cpu_s_per_gb": run["server_cpu_seconds"] / gigabytes,
        "client_cpu_s_per_gb": run["client_cpu_seconds"] / gigabytes,
    }


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=4.0)
    parser.add_argument("--sizes", default="204800,1048576,4194304")
    args = parser.parse_args()
    duration, _, _ = h.timing(args)
    sizes = [204800] if args.quick else [int(size) for size in args.sizes.split(",")]
    results = [measure(size, duration, h.stop_after(args)) for size in sizes]
    print(
        h.table(
            f"bare grpcio stream, {duration:g} s per size",
            ["KB", "msg/s", "GB/s", "srv us/msg", "cli us/msg", "srv s/GB", "cli s/GB"],
            [
                [
                    r["message_bytes"] // 1024,
                    r["messages_per_s"],
                    r["gb_per_s"],
                    r["server_us_per_message"],
                    r["client_us_per_message"],
                    r["server_cpu_s_per_gb"],
                    r["client_cpu_s_per_gb"],
                ]
                for r in results
            ],
        )
    )
    h.write_json("grpc_cost", args, {"results": results})


if __name__ == "__main__":
    main()
