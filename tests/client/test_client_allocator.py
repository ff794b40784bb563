"""A gRPC client reuses the memory of the messages it frees (``batchwire.allocator``).

Each trainer is a fresh process (the allocator's settings are process-wide) that
streams 4 MB batches from a real server (this module's) and counts its own minor
page faults per batch: with glibc's adaptive defaults every received message is
faulted in and zeroed anew.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from _serverproc import ServerProcess

from batchwire import allocator

BATCHES = 80
WARM_UP = 40  # batches before counting: the heap grows to its working size in bursts
CONFIG = """
[server]
chunk_bytes = 4194304

[datasets.frames]
source = "synthetic"
length = 4096
seed = 3
fields.image = { shape = [1000, 1000], dtype = "float32" }
fields.label = { shape = [], dtype = "int64", high = 10 }
"""
TRAINER = f"""
import resource, sys
from batchwire import allocator
from batchwire.client import RemoteDataset

ds = RemoteDataset(sys.argv[1], "frames", batch_size=1, transport="grpc")
faults = 0
for seen, batch in enumerate(ds, 1):  # 4 MB a batch: one message of its own
    if seen == {WARM_UP}:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if seen == {WARM_UP} + {BATCHES}:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        print(allocator.thresholds_fixed())
        break
"""

glibc_only = pytest.mark.skipif(
    allocator._user_chose() not in (None, f"{allocator.ENV} is off"),
    reason="not glibc, or this environment sets malloc itself",
)


@pytest.fixture(scope="module")
def frames_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("allocator") / "frames.toml"
    config.write_text(CONFIG)
    with ServerProcess(config, workers=2) as server:
        yield server


def faults_per_batch(target: str, **env: str) -> tuple[float, bool]:
    """Minor page faults per 4 MB batch of a fresh trainer process, and whether it fixed the
    malloc thresholds."""
    environment = {name: value for name, value in os.environ.items() if name != allocator.ENV}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", TRAINER, target],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    faults, fixed = done.stdout.split()
    return int(faults) / BATCHES, fixed == "True"


@glibc_only
def test_a_grpc_trainer_reuses_message_memory_instead_of_faulting_it_in(frames_server) -> None:
    # A 4 MB message is 977 pages: glibc's adaptive defaults fault in ~300-560 of them
    # per batch here (RESULTS.md, "Allocator"), a process that keeps its memory ~0-50.
    tuned, fixed = faults_per_batch(frames_server.target)
    untouched, left = faults_per_batch(frames_server.target, **{allocator.ENV: "0"})
    assert fixed and not left, "the opt-out must leave glibc's own settings"
    assert tuned < 150, f"{tuned:.0f} page faults per batch (glibc defaults: {untouched:.0f})"


def test_the_opt_out_and_the_user_s_own_settings_are_respected(monkeypatch) -> None:
    own = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
    for name in (allocator.ENV, *own):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator._user_chose() == f"{allocator.ENV} is off"
    monkeypatch.delenv(allocator.ENV)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert allocator._user_chose() == "GLIBC_TUNABLES sets malloc"
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1")
    assert allocator._user_chose() == "MALLOC_TRIM_THRESHOLD_ is set"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    if allocator._glibc():
        monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
        assert allocator._user_chose() == "jemalloc is preloaded"


def test_both_thresholds_or_neither(monkeypatch) -> None:
    # Either one alone ends glibc's adaptation and is worse than its defaults.
    calls: list[int] = []

    class Libc:
        @staticmethod
        def mallopt(parameter: int, value: int) -> int:
            calls.append(parameter)
            return 0  # refused

    monkeypatch.setattr(allocator, "_user_chose", lambda: None)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc)
    assert allocator._apply() is False
    assert calls == [allocator._M_MMAP_THRESHOLD], "the trim threshold was set alone"
