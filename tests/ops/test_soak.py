"""Soak: good streams beside abuse and faults on one real server; nothing lost, nothing leaked.

Bounded by counts (rounds, batches), not by seconds: on a busy machine it takes
longer, never fails for it. What runs at the same time as the good streams:

- malformed requests (unknown dataset, a 1 MB name, bad ranks, batch sizes out
  of range, bytes that are no request at all) and a dataset whose item raises;
- clients that disconnect mid-stream;
- SIGKILLs of batch workers and of the pool's forkserver;
- idle reflection streams held open the whole time (more than the stream limit).

At the end: every good stream is complete and equal to the local reference,
health says SERVING, the server's RSS is within ``RSS_GROWTH_BOUND`` of its
baseline, and no payload file of this server is left in shared memory.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _serverproc import ServerProcess
from conftest import assert_same_batch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ops_support import health_status
from sample_datasets import IndexedDict
from torch.utils.data import DataLoader, DistributedSampler

from batchwire.client import BatchClient, RemoteDataset, RetryPolicy, ServerError
from batchwire.v1 import batchwire_pb2 as pb

TESTS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS_DIR / "pipeline"))
from pipeline_data import _children, _cmdline, worker_pids  # noqa: E402

STREAM_LIMIT = 8  # [server] max_concurrent_streams
IDLE_STREAMS = STREAM_LIMIT + 8  # idle reflection streams held open throughout
GOOD_STREAMS = 6  # good passes, two at a time
LENGTH = 240
BATCH = 8
RSS_GROWTH_BOUND = 256 * 2**20  # bytes the server may grow by over the soak
FAST_RETRY = RetryPolicy(attempts=500, deadline=240.0, initial_backoff=0.02, max_backoff=0.5)

CONFIG = f"""
[server]
python_path = ["{TESTS_DIR}", "{TESTS_DIR / "client"}"]
max_concurrent_streams = {STREAM_LIMIT}
prefetch_batches = 2
grace_seconds = 0.5

[datasets.good]
source = "python"
factory = "slow_datasets:slow_indexed"
kwargs = {{ length = {LENGTH}, delay = 0.002 }}

[datasets.failing]
source = "python"
factory = "sample_datasets:failing"
kwargs = {{ length = 40, bad_index = 13 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("soak") / "soak.toml"
    path.write_text(CONFIG)
    with ServerProcess(path, workers=2) as server:
        yield server


def reference(seed: int, epoch: int) -> list:
    dataset = IndexedDict(LENGTH)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=BATCH, sampler=sampler))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def payload_files(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/batchwire-{pid}-*")


def forkserver_pid(server_pid: int) -> int | None:
    return next((c for c in _children(server_pid) if b"forkserver" in _cmdline(c)), None)


class Abuse:
    """Runs one kind of abuse in a thread until told to stop; counts its rounds."""

    def __init__(self, name: str, step, stop: threading.Event) -> None:
        self.name, self.step, self.stop = name, step, stop
        self.rounds = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"soak-{name}", daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                self.rounds += 1
        except BaseException as exc:
            self.error = exc


def malformed_requests(target: str) -> None:
    client = BatchClient(target, timeout=30)
    bad = [
        (pb.StreamBatchesRequest(dataset="nope", batch_size=4, world_size=1), "NOT_FOUND"),
        (pb.StreamBatchesRequest(dataset="x" * 2**20, batch_size=4, world_size=1), "NOT_FOUND"),
        (pb.StreamBatchesRequest(dataset="good", batch_size=0, world_size=1), "INVALID_ARGUMENT"),
        (
            pb.StreamBatchesRequest(dataset="good", batch_size=4, world_size=2, rank=5),
            "INVALID_ARGUMENT",
        ),
        (pb.StreamBatchesRequest(dataset="failing", batch_size=4, world_size=1), "INTERNAL"),
    ]
    for request, code in bad:
        with pytest.raises(ServerError) as caught:
            list(client.batches(request))
        assert caught.value.code.name == code, (request.dataset[:20], caught.value)
    # Bytes that are no StreamBatchesRequest at all.
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream(
            "/batchwire.v1.BatchService/StreamBatches",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as raw:
            list(call(b"\xff\xff\xff\xff", timeout=30))
        assert raw.value.code() != grpc.StatusCode.UNKNOWN, raw.value


def disconnect_mid_stream(target: str) -> None:
    request = RemoteDataset(target, "good", batch_size=BATCH).request(0)
    call = BatchClient(target, timeout=30).stream(request)
    for received, _ in enumerate(call):
        if received == 2:
            break
    call.cancel()


def test_soak_good_streams_survive_abuse_and_faults(server: ServerProcess) -> None:
    target, pid = server.target, server.pid()
    list(BatchClient(target).batches(RemoteDataset(target, "good", batch_size=BATCH).request(0)))
    baseline_rss, baseline_files = rss_bytes(pid), len(payload_files(pid))

    # Idle reflection streams on one channel, held for the whole soak.
    idle_channel = grpc.insecure_channel(target)
    reflection = reflection_pb2_grpc.ServerReflectionStub(idle_channel)
    never = threading.Event()

    def quiet() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        never.wait()
        return
        yield

    idle_calls = [reflection.ServerReflectionInfo(quiet()) for _ in range(IDLE_STREAMS)]

    stop = threading.Event()
    kills = {"workers": 0, "forkserver": 0}

    def kill_something() -> None:
        # Three worker kills for each forkserver kill; a pause of a few batches between.
        victims = worker_pids(pid)
        if kills["workers"] < 3 * (kills["forkserver"] + 1) and victims:
            os.kill(victims[0], signal.SIGKILL)
            kills["workers"] += 1
        elif (fork := forkserver_pid(pid)) is not None:
            os.kill(fork, signal.SIGKILL)
            kills["forkserver"] += 1
        stop.wait(0.5)

    abuses = [
        Abuse("malformed", lambda: malformed_requests(target), stop),
        Abuse("disconnect", lambda: disconnect_mid_stream(target), stop),
        Abuse("kill", kill_something, stop),
    ]
    for abuse in abuses:
        abuse.thread.start()

    results: dict[tuple[int, int], list] = {}
    errors: list[BaseException] = []

    def good_pass(seed: int, epoch: int) -> None:
        try:
            ds = RemoteDataset(
                target, "good", batch_size=BATCH, shuffle=True, seed=seed, retry=FAST_RETRY
            )
            ds.set_epoch(epoch)
            results[(seed, epoch)] = list(ds)
        except BaseException as exc:
            errors.append(exc)

    try:
        for first in range(0, GOOD_STREAMS, 2):
            pair = [
                threading.Thread(target=good_pass, args=(seed, seed % 3))
                for seed in (first, first + 1)
            ]
            for thread in pair:
                thread.start()
            for thread in pair:
                thread.join(timeout=300)
                assert not thread.is_alive(), "a good stream hung"
    finally:
        stop.set()
        for abuse in abuses:
            abuse.thread.join(timeout=120)
        never.set()
        for call in idle_calls:
            call.cancel()
        idle_channel.close()

    assert not errors, errors
    for abuse in abuses:
        assert abuse.error is None, f"{abuse.name}: {abuse.error!r}"
        assert abuse.rounds > 0, f"{abuse.name} never ran"
    assert kills["workers"] > 0 and kills["forkserver"] > 0, kills
    for (seed, epoch), batches in sorted(results.items()):
        expected = reference(seed, epoch)
        assert len(batches) == len(expected), (seed, epoch, len(batches))
        for i, (got, want) in enumerate(zip(batches, expected, strict=True)):
            assert_same_batch(got, want, f"seed {seed} epoch {epoch} batch {i}")
    assert len(results) == GOOD_STREAMS

    assert health_status(target) == "SERVING"
    # Workers were replaced and serve a fresh stream.
    fresh = RemoteDataset(target, "good", batch_size=BATCH, retry=FAST_RETRY)
    assert len(list(fresh)) == LENGTH // BATCH
    growth = rss_bytes(pid) - baseline_rss
    assert growth < RSS_GROWTH_BOUND, f"server RSS grew by {growth / 2**20:.0f} MiB"
    deadline = time.monotonic() + 30
    while len(payload_files(pid)) > baseline_files and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(payload_files(pid)) <= baseline_files, payload_files(pid)
