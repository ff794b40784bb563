"""Starts a torchrun-style gloo job on loopback, for tests: one process per rank, env vars as torchrun sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from _serverproc import free_port


def run_gloo_job(script: str, args: list[str], world_size: int) -> list[dict[str, Any]]:
    """Runs ``python -c script *args`` as ``world_size`` ranks; returns each rank's last
    stdout line (JSON), sorted by its ``"rank"``. A rank that fails fails the test with its stderr."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env={
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(results, key=lambda result: result["rank"])
