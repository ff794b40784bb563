"""Issue 13.6: a discrete-event model of replicas x workers x trainers, calibrated and validated here.

    python benchmarks/scaleout_model.py [--duration 8] [--repeats 1] [--quick]

Two pipelines: ``jpeg`` (build-bound: 512 px JPEG decode, resize 128, random
crop 112, flip, ToTensor; batch 32, 4.8 MB) and ``imagenet`` (byte-bound: pre-made
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

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import _harness as h
from _des import Costs, Machine, Topology, background_for, predict
from pipeline_vs_dataloader import make_images

from batchwire.client import bench as load_test

JPEG = """
[datasets.jpeg]
source = "image_folder"
root = "{root}"
transforms.image = [
  {{ name = "Resize", size = 128 }},
  {{ name = "RandomCrop", size = {crop} }},
  {{ name = "RandomHorizontalFlip", p = 0.5 }},
  "ToTensor",
]
"""
PIPELINES = {"jpeg": 32, "imagenet": 64}  # name -> batch size
TRAINERS = 3
PREFETCH = 4  # the server's default prefetch_batches (the model's)
VALIDATE = [(1, 1), (2, 1), (3, 1), (1, 3)]  # (replicas, workers per replica)
PROJECT = [1, 2, 4, 8, 16, 32, 64]


class Replicas(contextlib.ExitStack):
    """``replicas`` real ``batchwire serve`` processes of one config, started together."""

    def __init__(self, config_text: str, replicas: int, workers: int) -> None:
        super().__init__()
        self.servers = [h.Server(config_text, workers=workers) for _ in range(replicas)]

    def __enter__(self) -> Replicas:
        super().__enter__()
        for server in self.servers:
            self.callback(server.__exit__)
        with ThreadPoolExecutor(len(self.servers)) as starting:  # start-up is mostly waiting
            list(starting.map(lambda server: server.__enter__(), self.servers))
        return self


def cpu_of(servers: list[h.Server]) -> dict[str, float]:
    spent = [s.cpu_seconds() for s in servers]
    return {key: sum(s[key] for s in spent) for key in ("server", "workers")}


@dataclass
class Snapshot:
    """CPU seconds so far: the replicas' gRPC processes, their workers, the trainers, the machine."""

    server: float
    workers: float
    trainers: float
    machine: float
    at: float
    each_server: tuple[float, ...]  # per replica's gRPC process: who served how much

    def __sub__(self, other: Snapshot) -> Snapshot:
        fields = ("server", "workers", "trainers", "machine", "at")
        each = tuple(a - b for a, b in zip(self.each_server, other.each_server, strict=True))
        return Snapshot(*(getattr(self, f) - getattr(other, f) for f in fields), each)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of this machine have used (every core; /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def spread_run(
    fleet: list[h.Server],
    targets: list[str],
    dataset: str,
    batch_size: int,
    *,
    duration: float,
    warmup: float,
) -> tuple[list[dict[str, Any]], Snapshot]:
    """``batchwire bench``'s clients, client i streaming from ``targets[i]``.

    The load test's own client body (``bench._client_main``) in spawned processes
    with a common start, so runs here measure what ``batchwire bench`` measures.
    Returns the clients' arrival records and the CPU spent in the measured window
    (after ``warmup``, ``duration`` seconds long) by each side and by the machine.
    """
    config = load_test.BenchConfig(
        targets[0], dataset, batch_size, duration=duration, warmup=warmup
    )
    ctx = mp.get_context("spawn")
    counters = ctx.Array("d", 2 * len(targets), lock=False)
    start_at, go, results = ctx.Value("d", 0.0, lock=False), ctx.Event(), ctx.Queue()
    processes = [
        ctx.Process(
            target=load_test._client_main,
            args=(replace(config, target=t), i, counters, start_at, go, results),
            daemon=True,
        )
        for i, t in enumerate(targets)
    ]
    for p in processes:
        p.start()

    def snapshot() -> Snapshot:
        cpu = cpu_of(fleet)
        trainers = sum(h._cpu(p.pid) for p in processes)
        each = tuple(h._cpu(server.pid()) for server in fleet)
        busy, now = machine_busy_seconds(), time.monotonic()
        return Snapshot(cpu["server"], cpu["workers"], trainers, busy, now, each)

    records: dict[int, dict[str, Any]] = {}
    try:
        load_test._await_ready(results, processes)
        start = time.monotonic() + 0.3
        start_at.value = start
        go.set()
        time.sleep(max(0.0, start + warmup - time.monotonic()))
        opened = snapshot()
        time.sleep(max(0.0, start + warmup + duration - time.monotonic()))
        window = snapshot() - opened
        deadline = time.monotonic() + 600
        while len(records) < len(targets):
            load_test._collect(results, records, timeout=0.5)
            dead = [i for i, p in enumerate(processes) if i not in records and not p.is_alive()]
            if time.monotonic() > deadline or (
                dead and not load_test._collect(results, records, 1.0)
            ):
                raise RuntimeError(f"clients did not finish: {len(records)} of {len(targets)} did")
    finally:
        for p in processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    ordered = [records[i] for i in range(len(targets))]
    errors = [s["error"] for r in ordered for s in r["streams"] if s["error"]]
    if errors:
        raise RuntimeError(f"streams failed: {errors[:3]}")
    # Arrivals inside the window, as `batchwire bench` counts them.
    opens, closes = start + warmup, start + warmup + duration
    for record in ordered:
        for stream in record["streams"]:
            inside = [i for i, t in enumerate(stream["times"]) if opens <= t < closes]
            stream["window_batches"] = len(inside)
            stream["window_bytes"] = sum(stream["raw_bytes"][i] for i in inside)
    return ordered, window


def measure(
    fleet: list[h.Server],
    workers: int,
    dataset: str,
    batch_size: int,
    trainers: int,
    args: argparse.Namespace,
    *,
    balanced: bool = False,
) -> dict[str, Any]:
    """One real run: throughput, CPU per batch of each side, and the cores others used meanwhile.

    Trainer i streams from replica i mod R; ``balanced``: every trainer gets the list
    of all replicas as its target, and gRPC's round_robin picks.
    """
    duration, warmup, _ = h.timing(args)
    replicas = len(fleet)
    targets = [fleet[i % replicas].target for i in range(trainers)]
    if balanced:
        targets = [",".join(server.target for server in fleet)] * trainers
    records, cpu = spread_run(fleet, targets, dataset, batch_size, duration=duration, warmup=warmup)
    streams = [s for r in records for s in r["streams"]]
    batches = max(1, sum(s["window_batches"] for s in streams))
    raw = sum(s["window_bytes"] for s in streams)
    # The rest of the machine's busy time in the window is other tenants' (this
    # script's own process sleeps through it).
    others = max(0.0, cpu.machine - cpu.server - cpu.workers - cpu.trainers)
    return {
        "replicas": replicas,
        "workers": workers,
        "trainers": trainers,
        "mb_per_s": raw / cpu.at / 1e6,
        "batches_per_s": batches / cpu.at,
        "batches": batches,
        "batch_bytes": raw // batches,
        "per_replica_batches": [
            sum(
                r["streams"][0]["window_batches"]
                for j, r in enumerate(records)
                if j % replicas == i
            )
            for i in range(replicas)
        ],
        "cpu_per_batch": {
            "build": cpu.workers / batches,
            "serve": cpu.server / batches,
            "receive": cpu.trainers / batches,
        },
        "others_cores": others / cpu.at,
        "balanced": balanced,
        "server_cpu_each": list(cpu.each_server),
        "window_seconds": cpu.at,
    }


def calibrate(runs: list[dict[str, Any]]) -> Costs:
    """Each cost the median over the calibration runs (one replica, worker and trainer)."""

    def median(key: str) -> float:
        return statistics.median(r["cpu_per_batch"][key] for r in runs)

    batch_bytes = int(statistics.median(r["batch_bytes"] for r in runs))
    return Costs(median("build"), median("serve"), median("receive"), batch_bytes)


def model_of(costs: Costs, run: dict[str, Any]) -> dict[str, Any]:
    """The model of one real run: this machine's cores, shared with the other tenants'
    threads that took the cores they took during that run."""
    machine = Machine(cores=os.cpu_count() or 1)
    topology = Topology(
        replicas=run["replicas"],
        workers=run["workers"],
        trainers=run["trainers"],
        prefetch=PREFETCH,
        shared=machine,
    )
    threads = background_for(run["others_cores"], costs, topology, machine, duration=10.0)
    shared = replace(machine, background=threads)
    predicted = predict(costs, replace(topology, shared=shared), duration=30.0, warmup=5.0)
    quiet = predict(costs, topology, duration=30.0, warmup=5.0)  # no other tenants
    return predicted | {"background_threads": threads, "quiet_mb_per_s": quiet["mb_per_s"]}


def project(
    costs: Costs, replica_cores: int, nic_gbit: float, trainers_per_replica: int, fleet: int
) -> list[dict[str, Any]]:
    """Throughput against the replica count, each replica a machine of its own.

    Two trainer fleets, each trainer on a machine of its own with one stream: one
    growing with the replicas (``trainers_per_replica``: the replicas bind), and
    a fixed one of ``fleet`` trainers (the trainers bind, once enough replicas run).
    """

    def run(replicas: int, trainers: int) -> dict[str, Any]:
        topology = Topology(
            replicas=replicas,
            workers=replica_cores,  # the server's default: one worker per core
            trainers=trainers,
            prefetch=PREFETCH,
            replica_machine=Machine(cores=replica_cores, nic_bytes_per_s=nic_gbit * 1e9 / 8),
            trainer_machine=Machine(cores=8),
        )
        return predict(costs, topology, duration=5.0, warmup=1.0)

    rows = []
    for replicas in PROJECT:
        growing = run(replicas, trainers_per_replica * replicas)
        fixed = run(replicas, fleet)
        rows.append(
            {
                "replicas": replicas,
                "batches_per_s": growing["batches_per_s"],
                "mb_per_s": growing["mb_per_s"],
                "fixed_fleet_mb_per_s": fixed["mb_per_s"],
            }
        )
    return rows


def main() -> None:
    parser = h.arguments(__doc__.splitlines()[0], duration=8.0, repeats=1)
    parser.add_argument("--replica-cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--nic-gbit", type=float, default=25.0)
    parser.add_argument("--trainers-per-replica", type=int, default=4, help="projection")
    parser.add_argument("--fleet", type=int, default=64, help="projection: a fixed trainer fleet")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="no measuring: the model again on the runs of these JSON files (pooled)",
    )
    parser.add_argument(
        "--acceptance",
        action="store_true",
        help="only issue 13 acceptance 6: imagenet, 3 replicas x 1 worker with one list "
        "target (round_robin) vs 1 server x 3 workers, --repeats times",
    )
    args = parser.parse_args()
    if args.acceptance:
        acceptance(args)
        return
    measured_on = {}
    if args.from_json:
        results, machines = pooled(args.from_json)
        measured_on = {"measured_on": machines}
    else:
        results = measure_all(args)
    for result in results.values():
        costs = calibrate(result["calibration"])
        result["costs"] = costs.__dict__
        for runs in result["validation"].values():
            for run in runs:
                run["model"] = model_of(costs, run)
        result["projection"] = project(
            costs, args.replica_cores, args.nic_gbit, args.trainers_per_replica, args.fleet
        )
    print(report(results))
    setup = {
        k: getattr(args, k) for k in ("replica_cores", "nic_gbit", "trainers_per_replica", "fleet")
    }
    h.write_json(
        "scaleout_model", args, {"pipelines": results, "trainers": TRAINERS, **setup, **measured_on}
    )


def acceptance(args: argparse.Namespace) -> None:
    """3 replicas x 1 worker, each trainer's target the list of all three (round_robin),
    against 1 server x 3 workers; 3 trainers of one stream each, interleaved."""
    _, _, repeats = h.timing(args)
    config = h.server_toml(
        [h.dataset_toml("imagenet", *h.SHAPES["imagenet"][1:], source="python", length=1 << 20)]
    )
    batch_size = 8 if args.quick else PIPELINES["imagenet"]
    runs: dict[str, list[dict[str, Any]]] = {"3x1 list": [], "1x3": []}
    with Replicas(config, 3, 1) as singles, Replicas(config, 1, 3) as triple:
        for _ in range(repeats):
            spread = measure(singles.servers, 1, "imagenet", batch_size, 3, args, balanced=True)
            runs["3x1 list"].append(spread)
            runs["1x3"].append(measure(triple.servers, 3, "imagenet", batch_size, 3, args))
            print(
                f"3x1 list {spread['mb_per_s']:.0f} MB/s (gRPC CPU by replica "
                f"{[round(c, 1) for c in spread['server_cpu_each']]} s), "
                f"1x3 {runs['1x3'][-1]['mb_per_s']:.0f} MB/s",
                flush=True,
            )
    pairs = [a["mb_per_s"] / b["mb_per_s"] for a, b in zip(*runs.values(), strict=True)]
    rows = [
        [
            i + 1,
            a["mb_per_s"],
            a["others_cores"],
            b["mb_per_s"],
            b["others_cores"],
            pair,
        ]
        for i, (a, b, pair) in enumerate(zip(*runs.values(), pairs, strict=True))
    ]
    columns = ["run", "3x1 list MB/s", "others' cores", "1x3 MB/s", "others' cores", "ratio"]
    print(h.table("imagenet, 3 trainers x 1 stream", columns, rows))
    print(f"median ratio {statistics.median(pairs):.2f}")
    h.write_json("scaleout_acceptance", args, {"runs": runs, "ratios": pairs})


def pooled(paths: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The calibration and validation runs of several recorded JSON files, together."""
    results: dict[str, Any] = {}
    machines = []
    for path in paths:
        recorded = json.loads(path.read_text())
        machines.append(recorded.get("measured_on") or recorded["machine"])
        for name, result in recorded["pipelines"].items():
            into = results.setdefault(
                name, {"batch_size": result["batch_size"], "calibration": [], "validation": {}}
            )
            into["calibration"] += result["calibration"]
            for key, runs in result["validation"].items():
                into["validation"].setdefault(key, []).extend(runs)
    return results, machines


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    """Calibration and validation runs of both pipelines: {name: {calibration, validation}}."""
    _, _, repeats = h.timing(args)
    folder = Path(tempfile.mkdtemp(prefix="batchwire-scaleout-"))
    try:
        count, size, crop = (48, 64, 56) if args.quick else (256, 512, 112)
        make_images(folder / "images", count, size)
        configs = {
            "jpeg": JPEG.format(root=folder / "images", crop=crop),
            "imagenet": h.dataset_toml(
                "imagenet", *h.SHAPES["imagenet"][1:], source="python", length=1 << 20
            ),
        }
        config = h.server_toml(list(configs.values()))
        sizes = {n: min(b, 8) if args.quick else b for n, b in PIPELINES.items()}
        results: dict[str, Any] = {
            n: {"batch_size": b, "calibration": [], "validation": {}} for n, b in sizes.items()
        }
        # Servers for every topology, started once: idle ones cost (almost) nothing.
        with Replicas(config, 3, 1) as singles, Replicas(config, 1, 3) as triple:
            for name, batch_size in sizes.items():
                for _ in range(repeats):
                    run = measure(singles.servers[:1], 1, name, batch_size, 1, args)
                    results[name]["calibration"].append(run)
            for _ in range(repeats):  # interleaved, so drift hits every topology alike
                for name, batch_size in sizes.items():
                    for replicas, workers in VALIDATE:
                        fleet = singles.servers[:replicas] if workers == 1 else triple.servers
                        run = measure(fleet, workers, name, batch_size, TRAINERS, args)
                        results[name]["validation"].setdefault(f"{replicas}x{workers}", []).append(
                            run
                        )
                        print(
                            f"{name} {replicas}x{workers}: {run['mb_per_s']:.0f} MB/s", flush=True
                        )
        return results
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(results: dict[str, Any]) -> str:
    out = []
    for name, result in results.items():
        c = result["costs"]
        out.append(
            f"{name}: batch {result['batch_size']}, {c['batch_bytes'] / 1e6:.2f} MB; CPU ms per batch: "
            f"build {c['build'] * 1e3:.1f}, serve {c['serve'] * 1e3:.1f} "
            f"({c['serve'] / c['batch_bytes'] * 1e9:.2f} ns/byte), receive {c['receive'] * 1e3:.1f}"
        )
        rows = []
        for key, runs in result["validation"].items():
            measured = statistics.median(r["mb_per_s"] for r in runs)
            modelled = statistics.median(r["model"]["mb_per_s"] for r in runs)
            errors = [(r["model"]["mb_per_s"] - r["mb_per_s"]) / r["mb_per_s"] for r in runs]
            others = statistics.median(r["others_cores"] for r in runs)
            every = " ".join(f"{r['mb_per_s']:.0f}/{r['model']['mb_per_s']:.0f}" for r in runs)
            quiet = runs[0]["model"]["quiet_mb_per_s"]
            error = statistics.median(errors)
            rows.append([key, measured, modelled, f"{error:+.0%}", others, quiet, every])
        columns = [
            "R x W",
            "measured MB/s",
            "model MB/s",
            "median error",
            "others' cores",
            "model, quiet machine",
            "each run: measured/model",
        ]
        out.append(h.table(f"validation ({TRAINERS} trainers, this machine)", columns, rows))
        spread, pooled = result["validation"].get("3x1"), result["validation"].get("1x3")
        if spread and pooled:
            ratio = statistics.median(r["mb_per_s"] for r in spread) / statistics.median(
                r["mb_per_s"] for r in pooled
            )
            pairs = " ".join(
                f"{a['mb_per_s'] / b['mb_per_s']:.2f}" for a, b in zip(spread, pooled, strict=True)
            )
            out.append(
                f"3 replicas x 1 worker / 1 server x 3 workers: {ratio:.2f} x the MB/s "
                f"(medians; run by run: {pairs})"
            )
        rows = [
            [
                p["replicas"],
                p["batches_per_s"],
                p["mb_per_s"],
                p["mb_per_s"] / p["replicas"],
                p["fixed_fleet_mb_per_s"],
            ]
            for p in result["projection"]
        ]
        columns = ["replicas", "batches/s", "MB/s", "MB/s per replica", "MB/s, fixed fleet"]
        out.append(h.table("projection (one machine per replica)", columns, rows))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
