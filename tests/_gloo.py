"""Starts a torchrun-style gloo job on loopback, for tests: one process per rank, env vars as torchrun sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _serverproc import free_port


def run_gloo_job(script: str, args: list[str], world_size: int) -> list[dict[str, Any]]:
    """Runs ``python -c script *args`` as ``world_size`` ranks; returns each rank's last
    stdout line (JSON), sorted by its ``"rank"``. A rank that fails fails the test with its stderr.

    Output goes to files, not pipes: a rank blocked on a full pipe while the harness
    waits on another would hang the collective. Ranks left running are killed."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gloo-") as folder:
        logs = [
            (Path(folder) / f"{rank}.out", Path(folder) / f"{rank}.err")
            for rank in range(world_size)
        ]
        procs: list[subprocess.Popen] = []
        try:
            for rank, (out, err) in enumerate(logs):
                with out.open("w") as stdout, err.open("w") as stderr:
                    procs.append(
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
                            stdout=stdout,
                            stderr=stderr,
                        )
                    )
            results = []
            for proc, (out, err) in zip(procs, logs, strict=True):
                proc.wait(timeout=180)
                assert proc.returncode == 0, err.read_text()
                results.append(json.loads(out.read_text().strip().splitlines()[-1]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return sorted(results, key=lambda result: result["rank"])
