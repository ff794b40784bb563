"""The grpc.aio server vs the synchronous grpcio server it replaced, in the same run.

    python benchmarks/aio_server.py [--before 0067735] [--duration 5] [--repeats 3] [--quick]

Two servers at once: this tree's, and the tree at git ref ``--before`` (the
last commit on grpcio's synchronous server), extracted to a temporary folder
as a package and put first on that server's PYTHONPATH. The same client code
measures both, in alternating runs, so the ratio is of the same minutes of a
shared machine. Cases: mnist (64 x 784 float32, ~200 KB batches: messages
per second, one stream and four), imagenet (9.6 MB batches in 4 MiB chunks:
GB/s), and the time a health check takes while ``max_concurrent_streams + 8``
idle reflection streams are open on one connection.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import _harness as h

BEFORE = "0067735"  # the last commit serving with grpcio's synchronous server
MAX_STREAMS = 8
CHUNK_BYTES = 4 << 20
CASES = [("mnist", 1), ("mnist", 4), ("imagenet", 1)]  # (shape, streams)


def package_at(ref: str, folder: Path) -> Path:
    """The batchwire package of git ``ref`` laid out under ``folder``; returns the PYTHONPATH."""
    root = Path(
        subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=h.HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    tree = folder / "tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", ref, "core", "server", "client"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = folder / "pkg" / "batchwire"
    package.parent.mkdir()
    (tree / "core").rename(package)  # batchwire and batchwire.v1
    (tree / "server").rename(package / "server")
    (tree / "client").rename(package / "client")
    path = str(package.parent)
    where = subprocess.run(
        [sys.executable, "-c", "import batchwire.server.app as a; print(a.__file__)"],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(path):
        raise RuntimeError(f"--before {ref}: batchwire still imports from {where}")
    return package.parent


def _idle_requests(release: threading.Event) -> Iterator:
    from grpc_reflection.v1alpha import reflection_pb2

    yield reflection_pb2.ServerReflectionRequest(list_services="")
    release.wait()


def health_with_idle_streams(target: str, timeout: float) -> float | None:
    """Seconds a health check takes with MAX_STREAMS + 8 idle reflection streams; None: none."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    release = threading.Event()
    idle = []
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        try:
            for _ in range(MAX_STREAMS + 8):
                call = stub.ServerReflectionInfo(_idle_requests(release), timeout=60)
                next(call)
                idle.append(call)
            started = time.perf_counter()
            try:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.RpcError:
                return None
            return time.perf_counter() - started
        finally:
            release.set()
            for call in idle:
                call.cancel()


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=5.0, repeats=3)
    parser.add_argument("--before", default=BEFORE, help="git ref of the synchronous server")
    args = parser.parse_args()
    duration, warmup, repeats = h.timing(args)
    cases = CASES[:1] if args.quick else CASES
    datasets = []
    for name in sorted({shape for shape, _ in cases}):
        _, shape, dtype = h.SHAPES[name]
        datasets.append(h.dataset_toml(name, shape, dtype, source="python", length=1 << 20))
    config = h.server_toml(datasets, chunk_bytes=CHUNK_BYTES, max_concurrent_streams=MAX_STREAMS)
    runs: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    health: dict[str, list[float | None]] = {"sync": [], "aio": []}
    with tempfile.TemporaryDirectory(prefix="batchwire-before-") as folder:
        before = package_at(args.before, Path(folder))
        env = {"PYTHONPATH": os.pathsep.join([str(before), os.environ.get("PYTHONPATH", "")])}
        with h.Server(config, env=env) as sync, h.Server(config) as aio:
            servers = {"sync": sync, "aio": aio}
            for repeat in range(repeats):
                # Alternate which goes first: neither always gets the fresher minute.
                order = ["sync", "aio"] if repeat % 2 == 0 else ["aio", "sync"]
                for shape, streams in cases:
                    key = f"{shape}/streams={streams}"
                    for kind in order:
                        report = h.bench(
                            servers[kind],
                            shape,
                            h.SHAPES[shape][0],
                            duration=duration,
                            warmup=warmup,
                            streams=streams,
                        )
                        value = report["mb_per_s"] / 1e3 if shape != "mnist" else None
                        value = value if value is not None else report["batches_per_s"]
                        runs.setdefault(key, {"sync": [], "aio": []})[kind].append(value)
                        # CPU of the gRPC process per batch: less at the mercy of a busy
                        # machine than the rate.
                        batch_bytes = report["bytes"] / max(report["batches"], 1)
                        cpu_ms = report["cpu_seconds_per_gb"]["server"] * batch_bytes / 1e6
                        cpu.setdefault(key, {"sync": [], "aio": []})[kind].append(cpu_ms)
                for kind in order:
                    health[kind].append(health_with_idle_streams(servers[kind].target, 5.0))
    rows, results = [], {}
    for key, by_kind in runs.items():
        sync_value, aio_value = (statistics.median(by_kind[k]) for k in ("sync", "aio"))
        sync_cpu, aio_cpu = (statistics.median(cpu[key][k]) for k in ("sync", "aio"))
        unit = "batches/s" if key.startswith("mnist") else "GB/s"
        results[key] = {
            "unit": unit,
            "sync": sync_value,
            "aio": aio_value,
            "ratio_aio_sync": aio_value / sync_value,
            "runs": by_kind,
            "server_cpu_ms_per_batch": {"sync": sync_cpu, "aio": aio_cpu},
            "server_cpu_ms_per_batch_runs": cpu[key],
        }
        rows.append([key, unit, sync_value, aio_value, aio_value / sync_value, sync_cpu, aio_cpu])
    for kind in ("sync", "aio"):
        answered = [s for s in health[kind] if s is not None]
        results[f"health_with_{MAX_STREAMS + 8}_idle_streams/{kind}"] = {
            "answered": len(answered),
            "timed_out": len(health[kind]) - len(answered),
            "median_ms": statistics.median(answered) * 1e3 if answered else None,
        }
    health_cells = [
        f"{results[f'health_with_{MAX_STREAMS + 8}_idle_streams/{k}']['timed_out']} of "
        f"{len(health[k])} timed out"
        for k in ("sync", "aio")
    ]
    rows.append(
        [f"health, {MAX_STREAMS + 8} idle streams", "5 s deadline", *health_cells, None, None, None]
    )
    print(
        h.table(
            f"grpc.aio server vs synchronous (--before {args.before}), {duration:g} s x "
            f"{repeats} alternating (median)",
            ["case", "unit", "sync", "aio", "aio / sync", "srv CPU ms/batch sync", "aio"],
            rows,
        )
    )
    h.write_json(
        "aio_server",
        args,
        {
            "before": args.before,
            "duration_s": duration,
            "repeats": repeats,
            "max_concurrent_streams": MAX_STREAMS,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
