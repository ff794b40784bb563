"""Issue 14, the Ray executor: equal streams, a stuck sample, a lost node (acceptance 1-3).

The scenarios run in ``ray_scenario.py`` inside a network namespace whose
only interface is ``lo`` (``unshare -n``, as root, which CI is): Ray picks its
node address from the machine's network and probes a public address to do
so; there it finds only 127.0.0.1, and nothing can leave the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

HERE = Path(__file__).resolve().parent
NAMESPACE_OK = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")


@pytest.mark.skipif(not NAMESPACE_OK, reason="needs root, unshare and ip for a loopback-only netns")
def test_ray_executor_streams_equal_the_in_process_ones(tmp_path: Path) -> None:
    script = f"ip link set lo up && exec {sys.executable} {HERE / 'ray_scenario.py'} {tmp_path}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        ["unshare", "-n", "--", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # bounds a hang; the scenarios take about a minute
    )
    output = done.stdout + done.stderr[-6000:]
    assert done.returncode == 0, output
    assert done.stdout.strip().endswith("OK"), output
    assert "byte-identical" in done.stdout
