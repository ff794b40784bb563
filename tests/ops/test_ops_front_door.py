"""The front door: calls that hold nothing but a connection, and bytes that are no message.

Neither may take what batch streams and health checks need: idle streams of
other services must not starve them, and a caller without a token must not be
able to make the server log (a traceback per request fills a disk).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _serverproc import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_ops_health import one_stream, write_config

TOKEN = "front-door-token"
MAX_STREAMS = 4
UNDECODABLE = b"\x0a\xff"  # field 1, length-delimited, with a truncated length: no message


def idle_requests(release: threading.Event) -> Iterator[reflection_pb2.ServerReflectionRequest]:
    """One request (so the server surely runs the call), then nothing until released."""
    yield reflection_pb2.ServerReflectionRequest(list_services="")
    release.wait()


def test_idle_reflection_streams_starve_neither_health_nor_batch_streams(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"max_concurrent_streams = {MAX_STREAMS}")
    release = threading.Event()
    with (
        ServerProcess(config, workers=1) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        idle = []
        try:
            # As many idle calls as the synchronous server had threads: no token needed.
            for _ in range(MAX_STREAMS + 8):
                call = reflection.ServerReflectionInfo(idle_requests(release), timeout=120)
                next(call)  # the server has answered: the call is open there
                idle.append(call)
            health = health_pb2_grpc.HealthStub(channel)
            # Health watches wait for a change: as idle, and as open to anyone.
            for _ in range(4):
                watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                idle.append(watch)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=20)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert len(one_stream(server.target)) == 16  # 64 samples in batches of 4
            # The idle calls are still open.
            assert all(call.is_active() for call in idle)
        finally:
            release.set()
            for call in idle:
                call.cancel()


def raw_call(channel: grpc.Channel, method: str, streaming: bool, metadata=()):
    """``method`` called with UNDECODABLE; returns the status code."""
    if streaming:
        stream = channel.unary_stream(method)(UNDECODABLE, timeout=20, metadata=metadata)
        try:
            list(stream)
        except grpc.RpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""
    try:
        channel.unary_unary(method)(UNDECODABLE, timeout=20, metadata=metadata)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


BATCH_METHODS = [
    ("/batchwire.v1.BatchService/ListDatasets", False),
    ("/batchwire.v1.BatchService/CountBatches", False),
    ("/batchwire.v1.BatchService/StreamBatches", True),
]


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[ServerProcess]:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    config = write_config(tmp_path, f'[server.auth]\ntokens_file = "{tokens}"')
    server = ServerProcess(config, workers=1).start()
    try:
        yield server
    finally:
        server.stop()


def log_growth(server: ServerProcess, before: int) -> str:
    """What the server printed after ``before`` characters, once it has stopped."""
    assert server.stop() == 0
    return "".join(server.output)[before:]


def test_undecodable_requests_without_a_valid_token_are_unauthenticated_and_not_logged(
    token_server: ServerProcess,
) -> None:
    time.sleep(0.5)  # start-up lines are in
    before = len("".join(token_server.output))
    with grpc.insecure_channel(token_server.target) as channel:
        for i in range(50):
            method, streaming = BATCH_METHODS[i % len(BATCH_METHODS)]
            metadata = () if i % 2 else (("authorization", "Bearer wrong-token"),)
            code, details = raw_call(channel, method, streaming, metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, details)
    grown = log_growth(token_server, before)
    assert "Traceback" not in grown and "deserializ" not in grown
    assert len(grown) < 1000, grown  # a few lines of shutdown, nothing per request


def test_undecodable_requests_are_invalid_argument_and_not_logged(
    token_server: ServerProcess,
) -> None:
    time.sleep(0.5)
    before = len("".join(token_server.output))
    token = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(token_server.target) as channel:
        for method, streaming in BATCH_METHODS:
            code, details = raw_call(channel, method, streaming, token)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert "cannot decode" in details
        # Health needs no token, so its requests must not be able to fill the log either.
        for _ in range(20):
            code, _ = raw_call(channel, "/grpc.health.v1.Health/Check", False)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
    grown = log_growth(token_server, before)
    assert "Traceback" not in grown and "deserializ" not in grown
    assert len(grown) < 1000, grown
