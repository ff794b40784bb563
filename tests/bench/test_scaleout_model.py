"""benchmarks/_des.py (the scale-out model of issue 13.6): its arithmetic, and the script's
``--from-json`` path on the recorded measurements.

The measuring runs themselves (real replicas, minutes on this machine) are the
benchmark's, not the suite's; the model is plain Python and fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _des import Costs, Machine, Topology, background_for, predict  # noqa: E402

BUILD_BOUND = Costs(build=0.100, serve=0.004, receive=0.005, batch_bytes=4_800_000)
BYTE_BOUND = Costs(build=0.004, serve=0.0065, receive=0.008, batch_bytes=9_600_000)


def cpu_bound(costs: Costs, cores: float) -> float:
    return cores / (costs.build + costs.serve + costs.receive)


@pytest.mark.parametrize("costs", [BUILD_BOUND, BYTE_BOUND])
def test_a_shared_machine_is_bound_by_its_cores(costs: Costs) -> None:
    # 3 replicas, 3 trainers, everything on 2 cores: all of the CPU goes to batches.
    topology = Topology(replicas=3, workers=1, trainers=3, shared=Machine(cores=2))
    rate = predict(costs, topology, duration=30.0)["batches_per_s"]
    assert rate == pytest.approx(cpu_bound(costs, 2), rel=0.05)


def test_one_worker_builds_on_one_core_at_most() -> None:
    topology = Topology(replicas=1, workers=1, trainers=3, shared=Machine(cores=2))
    rate = predict(BUILD_BOUND, topology, duration=30.0)["batches_per_s"]
    assert rate == pytest.approx(1 / BUILD_BOUND.build, rel=0.05)


def test_replicas_on_their_own_machines_scale_linearly() -> None:
    def rate(replicas: int) -> float:
        topology = Topology(
            replicas=replicas,
            workers=2,
            trainers=4 * replicas,
            replica_machine=Machine(cores=2),
            trainer_machine=Machine(cores=8),
        )
        return predict(BUILD_BOUND, topology, duration=20.0)["batches_per_s"]

    one = rate(1)
    assert one == pytest.approx(2 / (BUILD_BOUND.build + BUILD_BOUND.serve), rel=0.05)
    assert rate(8) == pytest.approx(8 * one, rel=0.02)


def test_a_stream_overlaps_sending_and_receiving() -> None:
    # One stream alone on 2 cores: with a window of 2 batches the server sends while the
    # trainer decodes, so both cores work; with 1 they take turns.
    def rate(window: int) -> float:
        topology = Topology(1, 2, 1, window=window, shared=Machine(cores=2))
        return predict(BYTE_BOUND, topology, duration=20.0)["batches_per_s"]

    assert rate(1) == pytest.approx(1 / (BYTE_BOUND.serve + BYTE_BOUND.receive), rel=0.05)
    assert rate(2) == pytest.approx(cpu_bound(BYTE_BOUND, 2), rel=0.05)


def test_background_threads_take_their_share_and_are_fitted_back() -> None:
    machine = Machine(cores=2)
    topology = Topology(replicas=3, workers=1, trainers=3, shared=machine)
    busy = predict(BYTE_BOUND, Topology(3, 1, 3, shared=Machine(cores=2, background=2.0)))
    quiet = predict(BYTE_BOUND, topology)
    assert 0.2 < busy["others_cores"] < 1.0  # 2 of the ~9 runnable threads
    assert busy["batches_per_s"] < quiet["batches_per_s"]
    fitted = background_for(busy["others_cores"], BYTE_BOUND, topology, machine, duration=20.0)
    assert fitted == pytest.approx(2.0, rel=0.1)


def test_the_model_runs_on_the_recorded_measurements(tmp_path: Path) -> None:
    # The recorded runs, one of each topology (the model runs once per run; fewer is faster).
    recorded = json.loads((BENCHMARKS / "results" / "scaleout_model.json").read_text())
    for pipeline in recorded["pipelines"].values():
        pipeline["validation"] = {k: runs[:1] for k, runs in pipeline["validation"].items()}
    trimmed = tmp_path / "recorded.json"
    trimmed.write_text(json.dumps(recorded))
    out = tmp_path / "model.json"
    script = str(BENCHMARKS / "scaleout_model.py")
    result = subprocess.run(
        [sys.executable, script, "--from-json", str(trimmed), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 replicas x 1 worker / 1 server x 3 workers" in result.stdout
    data = json.loads(out.read_text())
    for pipeline in data["pipelines"].values():
        assert set(pipeline["validation"]) == {"1x1", "2x1", "3x1", "1x3"}
        projected = [row["replicas"] for row in pipeline["projection"]]
        assert projected[-1] == 64
