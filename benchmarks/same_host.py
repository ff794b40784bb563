"""Issue 15's targets, side by side in one run: one trainer on the server's host, per shape.

    python benchmarks/same_host.py [--shapes mnist,cifar,imagenet,big] [--duration 4] [--repeats 1]

As root it runs itself inside a network namespace with only ``lo`` (``unshare
-n``): tf.data service binds every interface. Per shape, one after another:

- batchwire over shared memory (``RemoteDataset(transport="shm")``; skipped,
  with a note, when the installed client has no ``transport`` argument),
- batchwire over gRPC (``transport="grpc"``),
- the bare grpcio stream of pre-built messages of batchwire's message size
  (``min(batch, chunk_bytes)``): grpcio's own floor,
- ``grpc_glibc_defaults`` and ``bare_grpc_kept``: the same two with the other
  allocator setting (``batchwire.allocator``): batchwire's client with glibc's
  adaptive malloc thresholds (``BATCHWIRE_MALLOC_TUNING=0``, as before it fixed
  them), and the bare stream's client with them fixed as batchwire's are. Not
  run unless asked for (``--ways``).
- tf.data service (``tfdata_peer.py`` in its own venv, ``make bench-tf-venv``;
  skipped with a note when that venv is missing): dispatcher + worker doing no
  work, one consumer,
- ``torch.utils.data.DataLoader(num_workers=2)`` over the same data
  (``_datasets``: the items the server's workers collate).

``--source`` says what the server's 2 workers serve, and the DataLoader too:

- ``arrays`` (the default): the ``arrays`` source over .npy files of random
  rows (``ARRAY_BYTES`` of them per shape, in the page cache), drawn at random
  with replacement (``sampler="random"``), as MNIST or CIFAR kept in .npy files
  are served: a batch is one fancy-index gather per field. The DataLoader
  reads the same files a sample at a time (``_datasets.Rows``).
- ``python``: ``_datasets:repeating``, a map-style dataset of a few pre-made
  items: a ``__getitem__`` per sample and a collate per batch.

Each client is a process of its own, iterating ``RemoteDataset`` as a training
loop does.
Targets: shm >= 3 x tf.data and >= 1.0 x DataLoader on every shape, mnist
over shm >= 4,000 batches/s, gRPC >= 0.8 x the bare stream.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as h
from _shapes import batch_bytes

CHUNK_BYTES = 4 << 20
TF_PYTHON = h.HERE / ".venv-tf" / "bin" / "python"
LENGTH = 1 << 20  # samples per epoch; a pass that ends starts the next epoch
ARRAY_BYTES = 64 << 20  # rows per shape of the arrays source (at least 4 batches)
WAYS = ["shm", "grpc", "bare_grpc", "tfdata", "dataloader"]
ALLOCATOR_WAYS = ["grpc_glibc_defaults", "bare_grpc_kept"]


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(batches: Any, warmup: float, duration: float, stop_after: int | None) -> dict:
    """Counts what ``batches`` yields after ``warmup`` s, for ``duration`` s (or ``stop_after``)."""
    started = time.perf_counter()
    for _ in batches:
        if time.perf_counter() - started >= warmup:
            break
    cpu, count, started = _cpu_self(), 0, time.perf_counter()
    for _ in batches:
        count += 1
        if count == stop_after or (
            stop_after is None and time.perf_counter() - started >= duration
        ):
            break
    return {
        "batches": count,
        "seconds": time.perf_counter() - started,
        "client_cpu_seconds": _cpu_self() - cpu,
    }


def _forever(iterable_factory: Any) -> Any:
    while True:
        yield from iterable_factory()


def batchwire_client(
    out: mp.Queue,
    target: str,
    shape: str,
    transport: str | None,
    source: str,
    timing: tuple,
    environment: dict[str, str],
) -> None:
    """One trainer: iterates ``RemoteDataset`` (pass after pass) and reports its rate."""
    os.environ.update(environment)
    from batchwire.client import RemoteDataset

    options: dict[str, Any] = {} if transport is None else {"transport": transport}
    if source == "arrays":  # a few rows, drawn with replacement: a long epoch
        options["sampler"] = {"kind": "random", "num_samples": LENGTH}
    ds = RemoteDataset(target, shape, batch_size=h.SHAPES[shape][0], **options)
    result = _timed(_forever(lambda: ds), *timing)
    result["transport"] = getattr(ds, "transport", "grpc")
    out.put(result)


def dataloader_client(out: mp.Queue, shape: str, files: dict | None, timing: tuple) -> None:
    """The local baseline: DataLoader(num_workers=2) over the same data as the server's."""
    import torch
    from _datasets import Repeating, Rows

    batch_size, image, dtype = h.SHAPES[shape]
    if files is None:
        dataset, sampler = Repeating(LENGTH, image, dtype), None
    else:
        dataset = Rows(files)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=LENGTH)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=2
    )
    batches = _forever(lambda: loader)
    result = _timed(batches, *timing)
    batches.close()  # the DataLoader shuts its workers down now, not at interpreter exit
    out.put(result)


def _in_process(target: Any, *args: Any) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    process = ctx.Process(target=target, args=(out, *args))
    process.start()
    try:
        return out.get(timeout=600)
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()


def _rates(result: dict, size: int) -> dict:
    seconds = result["seconds"]
    result["batches_per_s"] = result["batches"] / seconds
    result["gb_per_s"] = result["batches"] * size / seconds / 1e9
    return result


def measure_batchwire(
    server: h.Server,
    shape: str,
    transport: str,
    source: str,
    timing: tuple,
    environment: dict[str, str] | None = None,
) -> dict:
    from batchwire.client import RemoteDataset

    has_transport = "transport" in inspect.signature(RemoteDataset).parameters
    if transport == "shm" and not has_transport:
        return {"skipped": "the installed client has no transport argument (the shm branch)"}
    before = server.cpu_seconds()
    result = _in_process(
        batchwire_client,
        server.target,
        shape,
        transport if has_transport else None,
        source,
        timing,
        environment or {},
    )
    after = server.cpu_seconds()
    result = _rates(result, batch_bytes(shape))
    gigabytes = max(result["gb_per_s"] * result["seconds"], 1e-9)
    span = result["seconds"] + timing[0]  # the server worked through the warm-up too
    result["cpu_seconds_per_gb"] = {
        "server": (after["server"] - before["server"]) * result["seconds"] / span / gigabytes,
        "workers": (after["workers"] - before["workers"]) * result["seconds"] / span / gigabytes,
        "client": result["client_cpu_seconds"] / gigabytes,
    }
    return result


def bare_kept_client(out: mp.Queue, size: int, timing: tuple) -> None:
    """The bare stream, received by a process whose malloc thresholds are fixed as batchwire's."""
    from batchwire import allocator

    if not allocator.keep_message_memory():
        out.put({"skipped": "malloc thresholds not fixed here (BATCHWIRE_MALLOC_TUNING, ...)"})
        return
    out.put(h.bare_grpc_run(size, timing[1], tuned=True, messages=timing[2]))


def measure_bare(shape: str, timing: tuple, *, kept: bool = False) -> dict:
    size = min(batch_bytes(shape), CHUNK_BYTES)
    if kept:
        run = _in_process(bare_kept_client, size, timing)
        if "skipped" in run:
            return run
    else:
        run = h.bare_grpc_run(size, timing[1], tuned=True, messages=timing[2])
    gigabytes = run["messages"] * size / 1e9
    return {
        "message_bytes": size,
        "messages_per_s": run["messages"] / run["seconds"],
        "gb_per_s": run["bytes_per_s"] / 1e9,
        "batches_per_s": run["bytes_per_s"] / batch_bytes(shape),
        "cpu_seconds_per_gb": {
            "server": run["server_cpu_seconds"] / gigabytes,
            "client": run["client_cpu_seconds"] / gigabytes,
        },
    }


def measure_tfdata(shape: str, timing: tuple) -> dict:
    if not TF_PYTHON.exists():
        return {"skipped": f"no {TF_PYTHON} (make bench-tf-venv)"}
    if not h.in_loopback_netns():
        return {
            "skipped": "not root: no loopback-only namespace, and tf.data binds every interface"
        }
    warmup, duration, stop_after = timing
    command = [str(TF_PYTHON), str(h.HERE / "tfdata_peer.py"), "--shape", shape]
    command += ["--warmup", str(warmup), "--duration", str(duration)]
    command += ["--batches", str(stop_after)] if stop_after else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=h.HERE)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"tfdata_peer.py failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def write_arrays(folder: Path, shape: str) -> dict[str, str]:
    """.npy files of random rows of ``shape`` (images and int64 labels); their paths by field."""
    import numpy as np

    batch_size, image, dtype = h.SHAPES[shape]
    rows = max(4 * batch_size, ARRAY_BYTES * batch_size // batch_bytes(shape))
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        images = rng.integers(0, 256, (rows, *image), dtype=np.uint8)
    else:
        images = rng.standard_normal((rows, *image), dtype=np.float32)
    files = {"image": folder / f"{shape}-image.npy", "label": folder / f"{shape}-label.npy"}
    np.save(files["image"], images)
    np.save(files["label"], rng.integers(0, 10, rows, dtype=np.int64))
    return {field: str(path) for field, path in files.items()}


def inside(args: Any) -> None:
    shapes = ["mnist"] if args.quick else args.shapes.split(",")
    ways = args.ways.split(",")
    duration, warmup, repeats = h.timing(args)
    timing = (warmup, duration, h.stop_after(args))
    with tempfile.TemporaryDirectory(prefix="batchwire-same-host-") as folder:
        files = {
            name: write_arrays(Path(folder), name) if args.source == "arrays" else None
            for name in shapes
        }
        datasets = [dataset_toml(name, files[name]) for name in shapes]
        runs = {name: {way: [] for way in WAYS + ALLOCATOR_WAYS} for name in shapes}
        config = h.server_toml(datasets, chunk_bytes=CHUNK_BYTES)
        with h.Server(config, workers=2) as server:
            for _ in range(repeats):
                for name in shapes:
                    measure_shape(server, name, files[name], args.source, ways, timing, runs[name])
    results = {name: _summary(runs[name]) for name in shapes}
    _print(results)
    h.write_json(
        "same_host",
        args,
        {
            "duration_s": duration,
            "repeats": repeats,
            "chunk_bytes": CHUNK_BYTES,
            "source": args.source,
            "results": results,
            "runs": runs,
            "targets": {
                "shm_over_tfdata": ">= 3 on every shape",
                "shm_over_dataloader": ">= 1.0 on every shape",
                "mnist_shm_batches_per_s": ">= 4000",
                "grpc_over_bare_grpc": ">= 0.8 on every shape",
            },
        },
    )


def dataset_toml(name: str, files: dict[str, str] | None) -> str:
    if files is None:
        shape, dtype = h.SHAPES[name][1:]
        return h.dataset_toml(name, shape, dtype, source="python", length=LENGTH)
    return (
        f'[datasets.{name}]\nsource = "arrays"\n'
        f'files = {{ image = "{files["image"]}", label = "{files["label"]}" }}\n'
    )


def measure_shape(
    server: h.Server,
    name: str,
    files: dict[str, str] | None,
    source: str,
    ways: list[str],
    timing: tuple,
    got: dict[str, list[dict]],
) -> None:
    """One repeat of every way in ``ways`` for shape ``name``, appended to ``got``."""
    size = batch_bytes(name)
    measure = {
        "shm": lambda: measure_batchwire(server, name, "shm", source, timing),
        "grpc": lambda: measure_batchwire(server, name, "grpc", source, timing),
        "bare_grpc": lambda: measure_bare(name, timing),
        "grpc_glibc_defaults": lambda: measure_batchwire(
            server, name, "grpc", source, timing, {"BATCHWIRE_MALLOC_TUNING": "0"}
        ),
        "bare_grpc_kept": lambda: measure_bare(name, timing, kept=True),
        "tfdata": lambda: measure_tfdata(name, timing),
        "dataloader": lambda: _rates(_in_process(dataloader_client, name, files, timing), size),
    }
    for way in ways:
        got[way].append(measure[way]())
    print(f"{name}: " + ", ".join(_brief(w, got[w][-1]) for w in ways), flush=True)


def _brief(way: str, result: dict) -> str:
    if "skipped" in result:
        return f"{way} skipped"
    return f"{way} {result['gb_per_s']:.2f} GB/s ({result['batches_per_s']:,.0f}/s)"


def _summary(runs: dict[str, list[dict]]) -> dict:
    """Median rate of each way, and the target ratios."""
    median: dict[str, Any] = {}
    for way, results in runs.items():
        done = [r for r in results if "skipped" not in r]
        if not done:
            median[way] = {"skipped": results[0]["skipped"] if results else "not run"}
            continue
        best = h.best(done, "gb_per_s")
        median[way] = {
            "gb_per_s": statistics.median(r["gb_per_s"] for r in done),
            "batches_per_s": statistics.median(r["batches_per_s"] for r in done),
            "cpu_seconds_per_gb": best.get("cpu_seconds_per_gb"),
        }

    def ratio(a: str, b: str) -> float | None:
        if "gb_per_s" not in median[a] or "gb_per_s" not in median[b]:
            return None
        return median[a]["gb_per_s"] / median[b]["gb_per_s"]

    median["ratios"] = {
        "shm_over_tfdata": ratio("shm", "tfdata"),
        "shm_over_dataloader": ratio("shm", "dataloader"),
        "grpc_over_bare_grpc": ratio("grpc", "bare_grpc"),
        "grpc_over_tfdata": ratio("grpc", "tfdata"),
        "grpc_over_bare_grpc_kept": ratio("grpc", "bare_grpc_kept"),
        "grpc_over_grpc_glibc_defaults": ratio("grpc", "grpc_glibc_defaults"),
    }
    return median


def _print(results: dict) -> None:
    def rate(result: dict) -> str | None:
        if "gb_per_s" not in result:
            return None
        return f"{result['gb_per_s']:.2f} ({result['batches_per_s']:,.0f}/s)"

    rows, allocator_rows = [], []
    for name, result in results.items():
        ratios = result["ratios"]
        rows.append(
            [name, *(rate(result[way]) for way in WAYS)]
            + [ratios[key] for key in ("shm_over_tfdata", "shm_over_dataloader")]
            + [ratios["grpc_over_bare_grpc"]]
        )
        if any("gb_per_s" in result[way] for way in ALLOCATOR_WAYS):
            allocator_rows.append(
                [
                    name,
                    *(rate(result[way]) for way in ALLOCATOR_WAYS),
                    ratios["grpc_over_grpc_glibc_defaults"],
                    ratios["grpc_over_bare_grpc_kept"],
                ]
            )
    print(
        h.table(
            "same host, GB/s (batches/s), median",
            [*["shape"], *WAYS, "shm/tf.data", "shm/DataLoader", "grpc/bare"],
            rows,
        )
    )
    if allocator_rows:
        print(
            h.table(
                "the other allocator setting, GB/s (batches/s), median",
                ["shape", *ALLOCATOR_WAYS, "grpc/grpc_glibc_defaults", "grpc/bare_grpc_kept"],
                allocator_rows,
            )
        )


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=4.0, warmup=1.5)
    parser.add_argument("--shapes", default="mnist,cifar,imagenet,big")
    parser.add_argument("--source", choices=["arrays", "python"], default="arrays")
    parser.add_argument(
        "--ways", default=",".join(WAYS), help="a subset of " + ",".join(WAYS + ALLOCATOR_WAYS)
    )
    args = parser.parse_args()
    if h.in_loopback_netns() or os.geteuid() != 0:
        inside(args)
        return
    h.rerun_in_loopback_netns(__file__)


if __name__ == "__main__":
    main()
