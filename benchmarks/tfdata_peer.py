"""The comparison peer: TensorFlow's tf.data service streaming one shape to one consumer.

    benchmarks/.venv-tf/bin/python benchmarks/tfdata_peer.py --shape cifar [--duration 5]

Runs in its own venv (``make bench-tf-venv``: tensorflow-cpu, never a project
dependency) and prints one JSON line. A dispatcher and a worker share a child
process; the worker does no work: its dataset is one pre-made batch
(``SHAPES[shape]``: images and int64 labels), cached, repeated. The consumer,
this process, iterates ``distribute(...)`` over gRPC as a trainer would. CPU
seconds of each side come from /proc. tf.data's servers bind every interface:
run this inside a loopback-only network namespace (``same_host.py`` does).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _shapes import SHAPES, batch_bytes

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def serve(port_queue: mp.Queue, stop: mp.Event) -> None:
    """A dispatcher and one worker in this process, until ``stop``."""
    import tensorflow as tf

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://", 1)[1]
    worker = service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
    port_queue.put(dispatcher.target)
    stop.wait()
    del worker, dispatcher


def dataset(shape_name: str, target: str, compression: str | None):
    import tensorflow as tf

    batch_size, shape, dtype = SHAPES[shape_name]

    def make(_):
        if dtype == "uint8":
            images = tf.random.stateless_uniform(
                [batch_size, *shape], seed=[0, 0], maxval=256, dtype=tf.int32
            )
            images = tf.cast(images, tf.uint8)
        else:
            images = tf.random.stateless_normal([batch_size, *shape], seed=[0, 0])
        labels = tf.range(batch_size, dtype=tf.int64) % 10
        return {"image": images, "label": labels}

    # Built once on the worker and cached: every later element is that batch again.
    local = tf.data.Dataset.from_tensors(0).map(make).cache().repeat()
    return local.apply(
        tf.data.experimental.service.distribute(
            processing_mode="parallel_epochs", service=target, compression=compression
        )
    )


def measure(
    shape_name: str, duration: float, warmup: float, batches: int | None, compression: str | None
) -> dict:
    ctx = mp.get_context("spawn")
    port_queue, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(port_queue, stop), daemon=True)
    server.start()
    try:
        target = port_queue.get(timeout=120)
        iterator = iter(dataset(shape_name, target, compression))
        started = time.perf_counter()
        while time.perf_counter() - started < warmup:
            next(iterator)
        server_before, client_before = cpu_seconds(server.pid), cpu_seconds(os.getpid())
        count, started = 0, time.perf_counter()
        while True:
            element = next(iterator)
            count += 1
            if count == batches or (batches is None and time.perf_counter() - started >= duration):
                break
        seconds = time.perf_counter() - started
        server_cpu = cpu_seconds(server.pid) - server_before
        client_cpu = cpu_seconds(os.getpid()) - client_before
        assert element["image"].shape[0] == SHAPES[shape_name][0]
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.kill()
    size = batch_bytes(shape_name)
    gigabytes = count * size / 1e9
    return {
        "shape": shape_name,
        "compression": compression or "none",
        "batches": count,
        "seconds": seconds,
        "batches_per_s": count / seconds,
        "gb_per_s": gigabytes / seconds,
        "batch_bytes": size,
        "cpu_seconds_per_gb": {"server": server_cpu / gigabytes, "client": client_cpu / gigabytes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--batches", type=int, help="stop after this many (instead of duration)")
    parser.add_argument(
        "--compression", choices=["none", "AUTO"], default="none", help="tf.data's; AUTO: snappy"
    )
    args = parser.parse_args()
    compression = None if args.compression == "none" else args.compression
    result = measure(args.shape, args.duration, args.warmup, args.batches, compression)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
