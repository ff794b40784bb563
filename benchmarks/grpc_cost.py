"""grpcio's own CPU cost per message and per GB: a bare stream of pre-built bytes.

    python benchmarks/grpc_cost.py [--duration 4] [--sizes 204800,1048576,4194304] [--quick]

The floor under target 1 and 2: whatever batchwire does, its server and
client pay at least this for the bytes they move through grpcio. Server CPU
from /proc, client CPU from ``getrusage`` (this process only receives).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

import _harness as h
import grpc

from batchwire.client._channel import _OPTIONS


def _client_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(size: int, seconds: float) -> dict[str, float]:
    # Message limits lifted first: with a key given twice, grpcio takes the first.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    options += [o for o in _OPTIONS if not o[0].endswith("message_length")]
    context = mp.get_context("spawn")
    port_queue = context.Queue()
    server = context.Process(target=h._bare_server, args=(port_queue, size, options), daemon=True)
    server.start()
    try:
        port = port_queue.get(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_stream(f"/{h._BARE_SERVICE}/Stream")
            for _ in call((8).to_bytes(8, "little")):  # connect and warm up
                pass
            server_before, client_before = h._cpu(server.pid), _client_seconds()
            messages, started = 0, time.perf_counter()
            stream = call((1 << 40).to_bytes(8, "little"))
            for _ in stream:
                messages += 1
                if time.perf_counter() - started >= seconds:
                    break
            elapsed = time.perf_counter() - started
            stream.cancel()
            server_cpu = h._cpu(server.pid) - server_before
            client_cpu = _client_seconds() - client_before
    finally:
        server.kill()
        server.join()
    gigabytes = messages * size / 1e9
    return {
        "message_bytes": size,
        "messages_per_s": messages / elapsed,
        "gb_per_s": gigabytes / elapsed,
        "server_us_per_message": server_cpu / messages * 1e6,
        "client_us_per_message": client_cpu / messages * 1e6,
        "server_cpu_s_per_gb": server_cpu / gigabytes,
        "client_cpu_s_per_gb": client_cpu / gigabytes,
    }


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=4.0)
    parser.add_argument("--sizes", default="204800,1048576,4194304")
    args = parser.parse_args()
    duration, _, _ = h.timing(args)
    sizes = [204800] if args.quick else [int(size) for size in args.sizes.split(",")]
    results = [measure(size, duration) for size in sizes]
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
