"""``batchwire bench`` against a real server: report content, JSON schema, error exits.

Runs end by a count of batches (``--batches``), never by seconds, so that a busy
machine cannot leave a window empty.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from _serverproc import ServerProcess, batchwire_command, free_port

TOP_KEYS = {
    "schema_version": int,
    "config": dict,
    "seconds": float,
    "dataset": dict,
    "batches": int,
    "batches_per_s": float,
    "samples_per_s": float,
    "bytes": int,
    "wire_bytes": int,
    "mb_per_s": float,
    "wire_mb_per_s": float,
    "time_to_first_batch_s": dict,
    "latency_s": dict,
    "latency_histogram": list,
    "clients": list,
    "fairness": float,
    "errors": list,
    "transport": str,
}
STAT_KEYS = {"count", "min", "mean", "p50", "p90", "p99", "max"}
CLIENT_KEYS = {
    "client",
    "batches",
    "batches_per_s",
    "mb_per_s",
    "time_to_first_batch_s",
    "cpu_seconds",
    "errors",
}


def bench(target: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*batchwire_command(), "bench", "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def report(core_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("bench") / "report.json"
    result = bench(
        core_server.target,
        *("--dataset", "big", "--batch-size", "2", "--clients", "2", "--streams", "2"),
        *("--batches", "6", "--warmup", "0.5", "--json", str(path)),
    )
    return result, json.loads(path.read_text()) if path.exists() else None


def test_report_has_every_section(report) -> None:
    result, _ = report
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in (
        "Target:",
        "Dataset:      big (synthetic, 24 samples)",
        "Batch:        2 samples, 8.389 MB",
        "Clients:      2 x 2 stream(s)",
        "Batches/s:",
        "Throughput:",
        "Time to first batch:",
        "Latency between batches",
        "p50",
        "p90",
        "p99",
        "max",
        "Latency histogram:",
        "Per client:",
        "Fairness (slowest/fastest):",
    ):
        assert text in out, f"{text!r} missing from:\n{out}"
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"], out  # one row per client
    assert "measuring" in result.stderr  # the live progress line


def test_json_schema_and_consistency(report) -> None:
    result, data = report
    assert result.returncode == 0, result.stderr
    for key, kind in TOP_KEYS.items():
        assert isinstance(data[key], kind), f"{key}: {data[key]!r}"
    assert data["schema_version"] == 1
    assert data["config"] == {
        "target": data["config"]["target"],
        "dataset": "big",
        "batch_size": 2,
        "clients": 2,
        "duration": 10.0,
        "warmup": 0.5,
        "streams": 2,
        "compression": "none",
        "shuffle": False,
        "batches": 6,
        "transport": "grpc",
    }
    assert data["dataset"]["batch_bytes"] == 2 * 1024 * 1024 * 4 + 2 * 8  # images, labels
    assert data["batches"] == 12 == sum(c["batches"] for c in data["clients"])
    assert data["bytes"] == data["batches"] * data["dataset"]["batch_bytes"]
    assert data["wire_bytes"] == data["bytes"]  # no compression asked
    seconds = data["seconds"]  # the longest client's window, to its 6th batch
    assert data["batches_per_s"] == pytest.approx(data["batches"] / seconds)
    assert data["mb_per_s"] == pytest.approx(data["bytes"] / seconds / 1e6)
    assert set(data["latency_s"]) == STAT_KEYS == set(data["time_to_first_batch_s"])
    latency = data["latency_s"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"]
    assert latency["p99"] <= latency["max"]
    assert sum(b["count"] for b in data["latency_histogram"]) == latency["count"]
    bounds = [b["le"] for b in data["latency_histogram"]]
    assert bounds == sorted(bounds) and bounds[-1] == pytest.approx(latency["max"])
    assert len(data["clients"]) == 2
    for client in data["clients"]:
        assert set(client) == CLIENT_KEYS
        assert client["batches"] == 6 and client["time_to_first_batch_s"] > 0
        assert client["batches_per_s"] >= 6 / seconds
    rates = [c["batches_per_s"] for c in data["clients"]]
    assert data["fairness"] == pytest.approx(min(rates) / max(rates))
    assert data["errors"] == []


def test_compressed_run_reports_wire_bytes(core_server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "lz4.json"
    result = bench(
        core_server.target,
        *("--dataset", "dict", "--batch-size", "8", "--compression", "lz4"),
        *("--batches", "4", "--warmup", "0", "--json", str(path)),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    assert data["config"]["compression"] == "lz4"
    assert data["batches"] == 4 and data["wire_bytes"] != data["bytes"]
    assert "wire" in result.stdout


def test_unreachable_server_exits_nonzero() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = bench(target, "--dataset", "big", "--batch-size", "2", "--batches", "1")
    # The message every client command gives (client/_channel.py), after the 5 s
    # connect timeout; the bound is generous (process start-up on a busy machine).
    assert time.monotonic() - started < 60  # bounds a hang (a retry budget would be ~32 s more)
    assert result.returncode == 1
    assert f"cannot reach {target}: is 'batchwire serve' running there?" in result.stderr
    assert "Summary" not in result.stdout


def test_unknown_dataset_exits_nonzero(core_server: ServerProcess) -> None:
    result = bench(core_server.target, "--dataset", "nope", "--batch-size", "2")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "'nope'" in result.stderr
    assert "big" in result.stderr  # lists what the server has


def test_batch_size_over_the_limit_exits_nonzero(core_server: ServerProcess) -> None:
    result = bench(core_server.target, "--dataset", "big", "--batch-size", "5000")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "5000" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--batch-size", "0"), ("--clients", "0"), ("--duration", "0"), ("--batches", "0")],
)
def test_bad_arguments_exit_2(core_server: ServerProcess, flag: str, value: str) -> None:
    args = {"--dataset": "big", "--batch-size": "2", flag: value}
    result = bench(core_server.target, *[x for kv in args.items() for x in kv])
    assert result.returncode == 2
    assert flag.lstrip("-").replace("-", "_") in result.stderr


def test_dataset_failing_mid_run_exits_nonzero(core_server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "failing.json"
    result = bench(
        core_server.target,
        *("--dataset", "failing", "--batch-size", "4", "--batches", "50", "--warmup", "0"),
        *("--json", str(path)),
    )
    assert result.returncode == 1
    assert "INTERNAL" in result.stdout and "sample index 13" in result.stdout
    assert "stream(s) failed" in result.stderr
    assert json.loads(path.read_text())["errors"]


@pytest.mark.parametrize("transport", ["shm", "auto"])
def test_the_same_host_path_is_load_tested_over_shared_memory(
    core_server: ServerProcess, tmp_path: Path, transport: str
) -> None:
    # The default stack's path (docker compose: the trainer maps the server's memory).
    path = tmp_path / "shm.json"
    result = bench(
        core_server.target,
        *("--dataset", "big", "--batch-size", "2", "--transport", transport),
        *("--batches", "6", "--warmup", "0", "--json", str(path)),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    assert data["transport"] == "shm" and data["batches"] == 6 and not data["errors"]
    assert data["bytes"] == 6 * 2 * (1024 * 1024 * 4 + 8)  # every batch whole: 2 images + labels
    assert "Transport:    shared memory" in result.stdout


def test_the_grpc_path_stays_the_default(report) -> None:
    result, data = report
    assert data["transport"] == "grpc" and data["config"]["transport"] == "grpc"
    assert "Transport:    gRPC (bytes)" in result.stdout
