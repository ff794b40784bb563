"""Same-host delivery over shared memory (issue 15): same batches, proven fallback, no leaks.

Real ``batchwire serve`` processes; trainers that get killed are child processes
(``shm_client.py``). Objects are counted per server pid (``batchwire-{pid}-*``):
other servers on the machine may hold their own.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _serverproc import ServerProcess
from conftest import CORE_CONFIG, assert_same_batch
from torch.utils.data import DataLoader

from batchwire.client import BatchClient, RemoteDataset
from batchwire.client._shm import PayloadMapper

CLIENT = str(Path(__file__).with_name("shm_client.py"))
GRID = list(itertools.product([1, 3], [False, True], [False, True], [0, 1]))
SHM_DIR = "/dev/shm"


def objects(pid: int) -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, f"batchwire-{pid}-*"))


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def leaves(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    items = batch.values() if isinstance(batch, dict) else batch
    return [leaf for item in items for leaf in leaves(item)]


def assert_identical(a, b, where: str) -> None:
    assert_same_batch(a, b, where)  # structure, dtypes, shapes, values
    for x, y in zip(leaves(a), leaves(b), strict=True):
        assert x.numpy().tobytes() == y.numpy().tobytes(), where


@pytest.mark.parametrize(("world_size", "shuffle", "drop_last", "epoch"), GRID)
def test_shm_and_grpc_batches_are_byte_identical(
    core_server, world_size, shuffle, drop_last, epoch
):
    for rank in range(world_size):
        kwargs = dict(
            batch_size=8,
            shuffle=shuffle,
            seed=42,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        shm = RemoteDataset(core_server.target, "dict", transport="shm", **kwargs)
        grpc = RemoteDataset(core_server.target, "dict", transport="grpc", **kwargs)
        shm.set_epoch(epoch)
        grpc.set_epoch(epoch)
        got, want = list(shm), list(grpc)
        assert shm.transport == "shm" and grpc.transport == "grpc"
        assert shm.stats().transport == "shm" and shm.stats().batches == len(want)
        assert len(got) == len(want) == len(shm)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_identical(a, b, f"rank {rank} batch {i}")


def test_big_batches_streams_and_dataloader_workers_match(core_server):
    target = core_server.target
    want = list(RemoteDataset(target, "big", batch_size=4, transport="grpc"))
    for streams in (1, 3):
        got = list(RemoteDataset(target, "big", batch_size=4, transport="shm", streams=streams))
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_identical(a, b, f"big streams={streams} batch {i}")
        assert len(got) == len(want) == 6
    # Written to: the mapping is private (copy-on-write), the next pass is unchanged.
    got[0]["image"].fill_(-1.0)
    again = list(RemoteDataset(target, "big", batch_size=4, transport="shm"))
    assert_identical(again[0], want[0], "after writing to a mapped batch")

    # Compression asked for: mapped payloads go uncompressed, the same batches arrive.
    lz4 = RemoteDataset(target, "big", batch_size=4, transport="shm", compression="lz4")
    for i, (a, b) in enumerate(zip(list(lz4), want, strict=True)):
        assert_identical(a, b, f"big lz4 batch {i}")

    expected = list(RemoteDataset(target, "tuple", batch_size=4, transport="grpc"))
    remote = RemoteDataset(target, "tuple", batch_size=4, transport="shm")
    loaded = list(DataLoader(remote, batch_size=None, num_workers=2))
    assert len(loaded) == len(expected) == 13
    for i, (a, b) in enumerate(zip(loaded, expected, strict=True)):
        assert_identical(a, b, f"DataLoader batch {i}")


def test_only_a_proven_nonce_gets_handles(core_server):
    client = BatchClient(core_server.target)
    request = RemoteDataset(core_server.target, "dict", batch_size=8).request(0)

    def chunks(nonce: bytes) -> list:
        request.shared_memory_nonce = nonce
        got, mapper = [], PayloadMapper()
        for chunk in client.stream(request):
            for part in (chunk, *chunk.packed):
                got.append(part)
                if part.shared is not None:  # mapped and counted: the server goes on
                    mapper(part.shared, part.header)
        return got

    for nonce in (b"", b"\0" * 16):  # none, or a guess: bytes only
        assert not [c for c in chunks(nonce) if c.shared is not None]
    proven = client.transport("auto")
    assert proven.transport == "shm"
    handles = [c.shared for c in chunks(proven.nonce) if c.header is not None]
    assert len(handles) == 13 and all(h is not None and h.path for h in handles)


def test_opt_out_and_env_take_grpc_and_say_so(core_server, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="batchwire.client")
    ds = RemoteDataset(core_server.target, "dict", batch_size=8, transport="grpc")
    assert len(list(ds)) == 13 and ds.transport == "grpc"
    assert ds.stats().transport.startswith("grpc/")
    assert "batches over gRPC (the client opted out (transport='grpc'))" in caplog.text
    monkeypatch.setenv("BATCHWIRE_TRANSPORT", "grpc")
    assert RemoteDataset(core_server.target, "dict", batch_size=8).transport == "grpc"
    monkeypatch.setenv("BATCHWIRE_TRANSPORT", "auto")
    caplog.clear()
    assert RemoteDataset(core_server.target, "dict", batch_size=8).transport == "shm"
    assert "batches over shared memory" in caplog.text
    with pytest.raises(ValueError, match="transport should be one of"):
        RemoteDataset(core_server.target, "dict", batch_size=8, transport="tcp")


@pytest.mark.skipif(
    os.geteuid() != 0, reason="running the trainer as another user (nobody) needs root"
)
def test_trainer_of_another_user_falls_back_to_grpc(core_server):
    def run(transport: str, *, user: str = "nobody") -> subprocess.CompletedProcess[str]:
        group = "nogroup" if user == "nobody" else user
        command = ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups"]
        command += [sys.executable, CLIENT, core_server.target, "dict", transport]
        env = {**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)

    auto = run("auto")
    assert auto.returncode == 0, auto.stderr
    lines = auto.stdout.splitlines()
    assert lines[0] == "transport grpc" and lines[-1] == "done grpc/tcp", auto.stdout
    got = [line for line in lines if line.startswith("got ")]
    assert len(got) == 26
    assert "batches over gRPC (this process (uid 65534) may not open" in auto.stderr
    mine = run("shm", user="root")  # the server's user: mapped, same batches
    assert mine.stdout.splitlines()[0] == "transport shm", mine.stderr
    assert [line for line in mine.stdout.splitlines() if line.startswith("got ")] == got
    required = run("shm")
    assert required.returncode != 0
    assert "TransportError: transport='shm' asked, but this process (uid 65534)" in (
        required.stderr
    )


@pytest.mark.skipif(
    os.geteuid() != 0, reason="running the trainer as another user (nobody) needs root"
)
def test_trainer_in_the_shm_group_maps(tmp_path: Path):
    config = tmp_path / "group.toml"
    config.write_text(CORE_CONFIG.replace("[server]\n", '[server]\nshm_group = "nogroup"\n', 1))
    with ServerProcess(config, workers=1) as server:
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        command += [sys.executable, CLIENT, server.target, "big", "auto"]
        env = {**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
        run = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0] == "transport shm" and lines[-1] == "done shm", run.stdout
        assert len([line for line in lines if line.startswith("got ")]) == 6


@pytest.fixture
def kill_server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "core.toml"
    config.write_text(CORE_CONFIG)
    with ServerProcess(config, workers=2) as server:
        yield server


def _client(target: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CLIENT, target, "big", "shm", "hold"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _read_until_batch(client: subprocess.Popen[str], batch: int) -> None:
    assert client.stdout is not None
    for line in client.stdout:
        if line.startswith(f"got {batch} "):
            return
    raise AssertionError(f"the trainer ended before batch {batch}")


def test_killed_trainer_then_killed_server_leave_no_shared_memory(kill_server, tmp_path):
    pid = kill_server.pid()
    assert wait_until(lambda: not objects(pid), 30), objects(pid)  # idle: nothing held
    # A trainer SIGKILLed while it maps batches: the server drops what it held for it.
    client = _client(kill_server.target)
    try:
        _read_until_batch(client, 1)
        assert objects(pid), "the stream should hold payloads in shared memory"
        client.send_signal(signal.SIGKILL)
        client.wait(30)
        assert wait_until(lambda: not objects(pid)), objects(pid)
        # The server SIGKILLed mid-stream: its objects go at the next server start.
        client = _client(kill_server.target)
        _read_until_batch(client, 1)
        kill_server.kill()
        assert objects(pid), "a SIGKILLed server cannot clean up"
        client.send_signal(signal.SIGKILL)
        client.wait(30)
        with ServerProcess(kill_server.config, workers=1) as after:
            assert wait_until(lambda: not objects(pid), 30), objects(pid)
            assert len(list(RemoteDataset(after.target, "dict", batch_size=8))) == 13
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(30)
