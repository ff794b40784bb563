"""The worker pool is supervised (real server): no fault leaves streams hanging behind SERVING.

Each fault here is real: an item nested too deep to encode (or a string), an
item that calls ``sys.exit`` or ``os._exit``, a forkserver that cannot accept
(its file limit lowered from outside), a server process that cannot open
another file, and SIGKILLs of the forkserver mid-stream. Streams run under a deadline, so a hang fails the test
with DEADLINE_EXCEEDED instead of blocking it.
"""

from __future__ import annotations

import itertools
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from _serverproc import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batchwire import compression, wire
from batchwire.v1 import batchwire_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from pipeline_data import _children, _cmdline  # the pipeline tests' helpers

HERE = Path(__file__).resolve().parent
WORKERS = 2
MARK = "BATCHWIRE_TEST_SERVER"  # in each test server's environment, to find its workers
DEADLINE = 60.0  # bounds a hang; a healthy stream here takes a few seconds at most

CONFIG = f"""
[server]
python_path = ["{HERE}"]

[datasets.deep]
source = "python"
factory = "pool_data:nested_at"
kwargs = {{ length = 40, bad = 13, depth = 50 }}

[datasets.text]
source = "python"
factory = "pool_data:nested_at"
kwargs = {{ length = 40, bad = 13, depth = 0 }}

[datasets.exits]
source = "python"
factory = "pool_data:exits_at"
kwargs = {{ length = 64, bad = 37 }}

[datasets.crashes]
source = "python"
factory = "pool_data:exits_at"
kwargs = {{ length = 64, bad = 37, hard = true }}

[datasets.range]
source = "python"
factory = "pool_data:hangs_at"
kwargs = {{ length = 400, hang = -1 }}

[datasets.blocks]
source = "python"
factory = "pool_data:slow_blocks"
kwargs = {{ length = 1000, delay = 0.02, size = 12800 }}
"""


def request(dataset: str, **fields: Any) -> pb.StreamBatchesRequest:
    fields.setdefault("batch_size", 1)
    return pb.StreamBatchesRequest(dataset=dataset, world_size=1, **fields)


def stream(
    channel: grpc.Channel,
    req: pb.StreamBatchesRequest,
    on_batch: Callable[[int, Any], None] | None = None,
) -> tuple[list[tuple[int, Any]], grpc.RpcError | None]:
    """One StreamBatches call under ``DEADLINE``: the batches received, and the error if any.

    ``on_batch(position, batch)`` runs as each batch arrives (to inject a fault mid-stream).
    """
    call = channel.unary_stream(
        "/batchwire.v1.BatchService/StreamBatches",
        request_serializer=pb.StreamBatchesRequest.SerializeToString,
        response_deserializer=wire.parse_chunk,
    )(req, timeout=DEADLINE)
    assembler = wire.BatchAssembler(compression.decompress)
    received: list[tuple[int, Any]] = []
    try:
        for chunk in call:
            for header, batch in assembler.feed(chunk):
                received.append((header.batch_index, batch))
                if on_batch is not None:
                    on_batch(header.batch_index, batch)
    except grpc.RpcError as error:
        return received, error
    return received, None


def health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def forkserver_pid(server_pid: int) -> int | None:
    for child in _children(server_pid):
        if b"forkserver" in _cmdline(child):
            return child
    return None


def pool_workers(server: ServerProcess) -> list[int]:
    """The server's batch workers, orphans of a killed forkserver included.

    A worker outlives a SIGKILLed forkserver (its parent) and goes on serving, so
    it is found by the marker in its environment, not by its parent.
    """
    workers = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        parent = int(status.split("PPid:")[1].split()[0])
        ours = f"{MARK}={server.env[MARK]}".encode() in environ.split(b"\0")
        if ours and b"forkserver" in _cmdline(int(entry)) and parent != server.pid():
            workers.append(int(entry))
    return sorted(workers)


def lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(len(used) + 1) if fd not in used)


def no_new_files(pid: int) -> tuple[int, int]:
    """Lowers ``pid``'s open-file limit so that it cannot open one more; returns the old limits."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid), old[1]))
    return old


def payload_files(pid: int) -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(f"batchwire-{pid}-"))


def assert_range(received: list[tuple[int, Any]], positions: range) -> None:
    assert [position for position, _ in received] == list(positions)
    for position, batch in received:
        assert torch.equal(batch, torch.tensor([[position]])), position


_servers = itertools.count()


def serve(config: Path) -> ServerProcess:
    """A server whose processes carry a ``MARK`` of their own."""
    return ServerProcess(config, workers=WORKERS, env={MARK: f"{os.getpid()}-{next(_servers)}"})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("supervise") / "supervise.toml"
    path.write_text(CONFIG)
    with serve(path) as server:
        yield server


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


# -- bad items: refused by name, the batches before them sent --------------------


@pytest.mark.parametrize(
    ("dataset", "why"),
    [("deep", "nested more than 32 containers deep"), ("text", "cannot send a str")],
)
def test_an_unsendable_item_ends_its_stream_naming_it_and_the_server_serves_on(
    server, channel, dataset, why
):
    received, error = stream(channel, request(dataset))
    assert error is not None and error.code() == grpc.StatusCode.INTERNAL, error
    message = error.details()
    assert f"'{dataset}'" in message and "sample index 13" in message, message
    assert why in message, message
    assert_range(received, range(13))  # the good batches before it
    # The pool is intact: other streams, the same dataset short of the item, health.
    assert_range(stream(channel, request("range", end_batch=50))[0], range(50))
    assert_range(stream(channel, request(dataset, end_batch=13))[0], range(13))
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_an_item_that_exits_names_its_sample_and_the_batches_before_it_arrive(server, channel):
    before = pool_workers(server)
    received, error = stream(channel, request("exits"))
    assert error is not None and error.code() == grpc.StatusCode.INTERNAL, error
    message = error.details()
    assert "'exits'" in message and "sample index 37" in message, message
    assert "SystemExit" in message and "item 37 gave up" in message, message
    # Small quick batches go several to a task: those before the item in its task too.
    assert_range(received, range(37))
    assert pool_workers(server) == before  # an exiting item fails its batch, not its worker
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_an_item_that_kills_its_worker_fails_its_batch_after_the_ones_before_it(server, channel):
    received, error = stream(channel, request("crashes"))
    assert error is not None and error.code() == grpc.StatusCode.INTERNAL, error
    message = error.details()
    assert "'crashes'" in message and "sample indices [37]" in message, message
    assert "died 3 times" in message and "exit code 3" in message, message
    # Its grouped task was rebuilt a batch per task: those before the item still arrive.
    assert_range(received, range(37))
    wait_until(lambda: len(pool_workers(server)) == WORKERS, 30, "the pool back at full size")
    assert_range(stream(channel, request("crashes", end_batch=37))[0], range(37))


# -- respawns: retried, and a pool that cannot recover says so ---------------------


def test_a_failed_respawn_is_retried_and_the_stream_completes(server, channel):
    assert len(pool_workers(server)) == WORKERS
    forkserver = forkserver_pid(server.pid())
    assert forkserver is not None
    # The forkserver cannot accept the next fork request: it dies of EMFILE, and the
    # respawn that asked fails (EOFError); the next attempt starts a new forkserver.
    no_new_files(forkserver)
    victim = pool_workers(server)[0]

    def kill_once(position: int, batch: Any) -> None:
        if position == 0:
            os.kill(victim, signal.SIGKILL)

    received, error = stream(channel, request("range", batch_size=4, end_batch=60), kill_once)
    assert error is None, error
    assert [position for position, _ in received] == list(range(60))
    for position, batch in received:
        expected = torch.arange(position * 4, position * 4 + 4).unsqueeze(1)
        assert torch.equal(batch, expected), position
    # The stream may end before the pool notices the kill (its batches were built): wait.
    wait_until(
        lambda: "respawn" in (output := "".join(server.output)) and "failed" in output,
        30,
        "a failed respawn logged",
    )
    wait_until(lambda: len(pool_workers(server)) == WORKERS, 30, "the pool back at full size")
    assert victim not in pool_workers(server)
    assert forkserver_pid(server.pid()) not in (None, forkserver)
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_sigkilled_forkserver_mid_stream_leaves_no_payload_files(server, channel):
    pid = server.pid()
    wait_until(lambda: not payload_files(pid), 30, "idle payload files trimmed")
    rounds = 4  # a new forkserver takes seconds to start: a round each ~100 batches at most
    req = request("blocks", batch_size=2, end_batch=450)  # 100 KB batches, 40 ms each
    kills = 0

    def kill_forkserver_and_a_worker(position: int, batch: Any) -> None:
        nonlocal kills
        forkserver, workers = forkserver_pid(pid), pool_workers(server)
        if kills < rounds and position % 4 == 3 and forkserver and len(workers) == WORKERS:
            # Both at once: the respawn races the dying forkserver.
            os.kill(forkserver, signal.SIGKILL)
            os.kill(workers[kills % WORKERS], signal.SIGKILL)
            kills += 1

    received, error = stream(channel, req, kill_forkserver_and_a_worker)
    assert error is None, f"the stream failed after {len(received)} batches: {error}"
    assert [position for position, _ in received] == list(range(450))
    for position, batch in received:
        expected = torch.tensor([[2.0 * position], [2.0 * position + 1]]).expand(2, 12800)
        assert torch.equal(batch, expected), position
    assert kills == rounds, f"only {kills} rounds of kills"
    # Free files are trimmed once the pool idles; a leaked one would stay until shutdown.
    wait_until(lambda: not payload_files(pid), 30, f"payload files {payload_files(pid)} removed")
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_an_unrecoverable_pool_turns_not_serving_and_refuses_new_streams(tmp_path: Path):
    path = tmp_path / "dying.toml"
    path.write_text(CONFIG)
    with serve(path) as server, grpc.insecure_channel(server.target) as channel:
        assert_range(stream(channel, request("range", end_batch=5))[0], range(5))
        # A stream open while the pool fails must end with a status, not hang.
        flowing = threading.Event()
        open_stream: list[tuple[list[tuple[int, Any]], grpc.RpcError | None]] = []
        reader = threading.Thread(
            target=lambda: open_stream.append(
                stream(channel, request("blocks"), lambda position, _: flowing.set())
            )
        )
        reader.start()
        assert flowing.wait(DEADLINE), "the open stream never got a batch"
        pid = server.pid()
        workers = pool_workers(server)
        old = no_new_files(pid)  # no respawn can even create its pipe now
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        wait_until(
            lambda: health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
            60,
            "health NOT_SERVING",
        )
        reader.join(DEADLINE + 10)
        [(_, open_error)] = open_stream
        # UNAVAILABLE (resume elsewhere), or INTERNAL if a batch could not be mapped (EMFILE).
        assert open_error is not None, "the open stream ended OK without workers"
        ended = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        assert open_error.code() in ended, open_error
        assert health(channel, "batchwire.v1.BatchService") == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        received, error = stream(channel, request("range", end_batch=5))
        assert received == [] and error is not None, error
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "worker pool" in error.details(), error.details()
        # Given files again, the pool recovers on its next attempt, and says so.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
        wait_until(
            lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING,
            60,
            "health SERVING again",
        )
        assert_range(stream(channel, request("range", end_batch=5))[0], range(5))
