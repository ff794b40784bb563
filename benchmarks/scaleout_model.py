"""Issue 13.6: a discrete-event model of replicas x workers x trainers, calibrated and validated here.

    python benchmarks/scaleout_model.py [--duration 8] [--repeats 1] [--quick]

Two pipelines: ``jpeg`` (build-bound: 512 px JPEG decode, resize 256, random
crop 224, flip, ToTensor; batch 16) and ``imagenet`` (byte-bound: pre-made
64x3x224x224 uint8 items, 9.6 MB batches whose worker only collates).

1. **Calibrate** (per pipeline): one real ``batchwire serve`` with one worker
   and one trainer; CPU seconds per batch of the workers, the gRPC process (/proc)
   and the trainer (its process time): build, serve and receive costs.
2. **Validate**: 1, 2 and 3 real replicas x 1 worker, and 1 server x 3 workers,
   with 3 trainers of one stream each, all on this machine. Trainer i streams
   from replica i mod R (each trainer names its replica). The model runs the
   same topology with this machine's cores as the shared resource, less the
   cores other tenants of the machine used during that run (from /proc/stat,
   minus our processes' CPU): predicted vs measured, and the error.
3. **Project** to 64 replicas on paper: one machine per replica (cores as
   here, ``--replica-cores``), trainers on machines of their own, a NIC per
   replica (``--nic-gbit``); the calibrated costs unchanged.

Acceptance 6 of issue 13 compares 3 replicas x 1 worker with 1 server x 3
workers (imagenet MB/s, the cost of spreading), from step 2.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _harness as h
from _des import Costs, Machine, Topology, predict
from pipeline_vs_dataloader import make_images

from batchwire.client import bench as load_test

JPEG = """
[datasets.jpeg]
source = "image_folder"
root = "{root}"
transforms.image = [
  {{ name = "Resize", size = 256 }},
  {{ name = "RandomCrop", size = {crop} }},
  {{ name = "RandomHorizontalFlip", p = 0.5 }},
  "ToTensor",
]
"""
PIPELINES = {"jpeg": 16, "imagenet": 64}  # name -> batch size
TRAINERS = 3
PREFETCH = 4  # the server's default prefetch_batches
VALIDATE = [(1, 1), (2, 1), (3, 1), (1, 3)]  # (replicas, workers per replica)
PROJECT = [1, 2, 4, 8, 16, 32, 64]


def machine_busy_seconds() -> float:
    """CPU seconds all processes of this machine have used (every core; /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Replicas(contextlib.ExitStack):
    """``replicas`` real ``batchwire serve`` processes of one config, started together."""

    def __init__(self, config_text: str, replicas: int, workers: int) -> None:
        super().__init__()
        self.servers = [h.Server(config_text, workers=workers) for _ in range(replicas)]

    def __enter__(self) -> Replicas:
        super().__enter__()
        for server in self.servers:
            self.enter_context(server)
        return self

    def cpu(self) -> dict[str, float]:
        spent = [s.cpu_seconds() for s in self.servers]
        return {key: sum(s[key] for s in spent) for key in ("server", "workers")}


def spread_run(
    targets: list[str],
    dataset: str,
    batch_size: int,
    *,
    duration: float,
    warmup: float,
    batches: int | None,
    snapshot: Callable[[], Any],
) -> dict[str, Any]:
    """``batchwire bench``'s clients, client i streaming from ``targets[i]``; the raw records.

    The load test's own client body (``bench._client_main``) in spawned processes
    with a common start, so runs here measure what ``batchwire bench`` measures.
    ``snapshot()`` is taken at the start and once every client is done (the
    clients' own start-up, importing torch, falls outside).
    """
    configs = [
        load_test.BenchConfig(
            t, dataset, batch_size, duration=duration, warmup=warmup, batches=batches
        )
        for t in targets
    ]
    ctx = mp.get_context("spawn")
    counters = ctx.Array("d", 2 * len(targets), lock=False)
    start_at, go, results = ctx.Value("d", 0.0, lock=False), ctx.Event(), ctx.Queue()
    processes = [
        ctx.Process(
            target=load_test._client_main, args=(c, i, counters, start_at, go, results), daemon=True
        )
        for i, c in enumerate(configs)
    ]
    for p in processes:
        p.start()
    records: dict[int, dict[str, Any]] = {}
    try:
        load_test._await_ready(results, processes)
        start = time.monotonic() + 0.3
        start_at.value = start
        go.set()
        report_snapshots = [snapshot()]
        deadline = start + warmup + duration + 600
        while len(records) < len(targets):
            load_test._collect(results, records, timeout=0.5)
            dead = [i for i, p in enumerate(processes) if i not in records and not p.is_alive()]
            if time.monotonic() > deadline or (
                dead and not load_test._collect(results, records, 1.0)
            ):
                raise RuntimeError(f"clients did not finish: {len(records)} of {len(targets)} did")
        report_snapshots.append(snapshot())
    finally:
        for p in processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    ordered = [records[i] for i in range(len(targets))]
    errors = [s["error"] for r in ordered for s in r["streams"] if s["error"]]
    if errors:
        raise RuntimeError(f"streams failed: {errors[:3]}")
    report = load_test.summarize(configs[0], _info(targets[0], dataset), 0, start, ordered)
    report["records"] = ordered
    report["snapshots"] = report_snapshots
    return report


def _info(target: str, dataset: str):
    from batchwire.client._channel import BatchClient

    return BatchClient(target).describe(dataset)


def measure(
    config_text: str,
    dataset: str,
    batch_size: int,
    replicas: int,
    workers: int,
    trainers: int,
    args,
) -> dict[str, Any]:
    """One real run; CPU per batch of each side and the cores others used meanwhile."""
    duration, warmup, _ = h.timing(args)
    with Replicas(config_text, replicas, workers) as fleet:
        targets = [fleet.servers[i % replicas].target for i in range(trainers)]

        def snapshot() -> tuple[dict[str, float], float, float]:
            return fleet.cpu(), machine_busy_seconds(), time.monotonic()

        report = spread_run(
            targets,
            dataset,
            batch_size,
            duration=duration,
            warmup=warmup,
            batches=h.stop_after(args),
            snapshot=snapshot,
        )
    (ours_before, busy_before, wall_before), (ours_after, busy_after, wall_after) = report.pop(
        "snapshots"
    )
    wall = wall_after - wall_before
    batches = sum(len(s["times"]) for r in report["records"] for s in r["streams"])
    raw = sum(sum(s["raw_bytes"]) for r in report["records"] for s in r["streams"])
    clients = sum(r["cpu_seconds"] for r in report["records"])
    server = ours_after["server"] - ours_before["server"]
    built = ours_after["workers"] - ours_before["workers"]
    # Ours: the replicas' trees and the trainers; the rest of the machine's busy time
    # in the same span is other tenants' (this script's own parent is mostly asleep).
    others = max(0.0, (busy_after - busy_before) - server - built - clients)
    return {
        "replicas": replicas,
        "workers": workers,
        "trainers": trainers,
        "mb_per_s": report["mb_per_s"],
        "batches_per_s": report["batches_per_s"],
        "batches_total": batches,
        "batch_bytes": raw // max(batches, 1),
        # A stream's server builds up to PREFETCH batches it never sends once the
        # trainer stops reading: the workers' CPU went to those too.
        "cpu_per_batch": {
            "build": built / (batches + PREFETCH * trainers),
            "serve": server / batches,
            "receive": clients / batches,
        },
        "others_cores": others / wall,
        "wall_seconds": wall,
    }


def calibrate(run: dict[str, Any]) -> Costs:
    cost = run["cpu_per_batch"]
    return Costs(
        build=cost["build"],
        serve=cost["serve"],
        receive=cost["receive"],
        batch_bytes=run["batch_bytes"],
    )


def model_of(costs: Costs, run: dict[str, Any]) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    available = max(0.25, cores - run["others_cores"])
    topology = Topology(
        prefetch=PREFETCH,
        replicas=run["replicas"],
        workers=run["workers"],
        trainers=run["trainers"],
        shared=Machine(cores=cores, available=available),
    )
    return predict(costs, topology, duration=60.0, warmup=5.0) | {"available_cores": available}


def project(
    costs: Costs, replica_cores: int, nic_gbit: float, trainers_per_replica: int
) -> list[dict[str, Any]]:
    rows = []
    for replicas in PROJECT:
        topology = Topology(
            replicas=replicas,
            workers=replica_cores,  # the server's default: one worker per core
            trainers=trainers_per_replica * replicas,
            replica_machine=Machine(cores=replica_cores, nic_bytes_per_s=nic_gbit * 1e9 / 8),
            trainer_machine=Machine(cores=8),
        )
        rows.append({"replicas": replicas, **predict(costs, topology, duration=10.0, warmup=2.0)})
    return rows


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=8.0, repeats=1)
    parser.add_argument("--replica-cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--nic-gbit", type=float, default=25.0)
    args = parser.parse_args()
    _, _, repeats = h.timing(args)
    folder = Path(tempfile.mkdtemp(prefix="batchwire-scaleout-"))
    try:
        count, size, crop = (48, 64, 56) if args.quick else (256, 512, 224)
        make_images(folder / "images", count, size)
        configs = {
            "jpeg": h.server_toml([JPEG.format(root=folder / "images", crop=crop)]),
            "imagenet": h.server_toml(
                [
                    h.dataset_toml(
                        "imagenet", *h.SHAPES["imagenet"][1:], source="python", length=1 << 20
                    )
                ]
            ),
        }
        results: dict[str, Any] = {}
        for name, batch_size in PIPELINES.items():
            batch_size = min(batch_size, 8) if args.quick else batch_size
            runs: dict[str, list[dict[str, Any]]] = {}
            calibration = [
                measure(configs[name], name, batch_size, 1, 1, 1, args) for _ in range(repeats)
            ]
            costs = calibrate(h.best(calibration))
            for _ in range(repeats):  # interleaved, so drift hits every topology alike
                for replicas, workers in VALIDATE:
                    run = measure(
                        configs[name], name, batch_size, replicas, workers, TRAINERS, args
                    )
                    run["model"] = model_of(costs, run)
                    runs.setdefault(f"{replicas}x{workers}", []).append(run)
                    print(_line(name, run), flush=True)
            results[name] = {
                "batch_size": batch_size,
                "calibration": calibration,
                "costs": costs.__dict__,
                "validation": runs,
                "projection": project(
                    costs, args.replica_cores, args.nic_gbit, trainers_per_replica=2
                ),
            }
        print()
        print(report(results))
        h.write_json("scaleout_model", args, {"pipelines": results, "trainers": TRAINERS})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _line(name: str, run: dict[str, Any]) -> str:
    m = run["model"]
    return (
        f"{name} {run['replicas']}x{run['workers']}: measured {run['mb_per_s']:.0f} MB/s, "
        f"model {m['mb_per_s']:.0f} MB/s ({m['available_cores']:.2f} cores free of others)"
    )


def report(results: dict[str, Any]) -> str:
    out = []
    for name, result in results.items():
        c = result["costs"]
        out.append(
            f"{name}: batch {result['batch_size']}, {c['batch_bytes'] / 1e6:.1f} MB; CPU ms per batch: "
            f"build {c['build'] * 1e3:.1f}, serve {c['serve'] * 1e3:.1f}, receive {c['receive'] * 1e3:.1f} "
            f"(serve {c['serve'] / c['batch_bytes'] * 1e9:.2f} ns/byte)"
        )
        rows = []
        for key, runs in result["validation"].items():
            measured = statistics.median(r["mb_per_s"] for r in runs)
            modelled = statistics.median(r["model"]["mb_per_s"] for r in runs)
            free = statistics.median(r["model"]["available_cores"] for r in runs)
            rows.append([key, measured, modelled, f"{(modelled - measured) / measured:+.0%}", free])
        out.append(
            h.table(
                "validation (3 trainers, this machine)",
                ["R x W", "measured MB/s", "model MB/s", "error", "free cores"],
                rows,
            )
        )
        rows = [[p["replicas"], p["batches_per_s"], p["mb_per_s"]] for p in result["projection"]]
        out.append(
            h.table("projection (one machine per replica)", ["replicas", "batches/s", "MB/s"], rows)
        )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
