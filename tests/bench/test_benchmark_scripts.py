"""A quick smoke run of each benchmark script (tiny sizes): it runs, prints a table, writes JSON.

The figures themselves are not checked here (benchmarks are not pass/fail;
see benchmarks/RESULTS.md); only that every script still works end to end
against a real server with its baselines. Quick runs end after a count of
batches, not seconds, so that a busy machine slows them down but cannot
leave a measurement empty.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
QUICK_BATCHES = 8  # benchmarks/_harness.py
SCRIPTS = {
    "wire_throughput": ["results", "baselines_bytes_per_s"],
    "mnist_rate": ["results", "bare_grpc_messages_per_s"],
    "chunking": ["results"],
    "fairness": ["aggregate_ratio", "fairness", "per_client"],
    "memory": ["results", "samples"],
    "compression_pays": ["results"],
    "pipeline_vs_dataloader": ["ratio", "local_samples_per_s", "batchwire_samples_per_s"],
    "grpc_cost": ["results"],
    "aio_server": ["results"],
    "shared_builds": ["ratio", "identical_batches_per_s", "different_seeds_batches_per_s"],
    "shm_throughput": ["mnist", "cifar"],
}
# The smoke run compares the tree with itself: an old ref may be missing from a shallow clone.
EXTRA_ARGS = {"aio_server": ["--before", "HEAD"]}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_runs_quick(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / f"{name}.py"),
            "--quick",
            "--json",
            str(out),
            *EXTRA_ARGS.get(name, []),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "---" in result.stdout  # the table's rule
    data = json.loads(out.read_text())
    assert data["benchmark"] == name and data["quick"] is True
    assert data["machine"]["cores"] >= 1
    for key in SCRIPTS[name]:
        assert data[key], f"{name}: {key} is empty"
    if name == "fairness":  # every client measured exactly the quick count
        assert [c["batches"] for c in data["per_client"]] == [QUICK_BATCHES] * data["clients"]
