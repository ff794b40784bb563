"""A trainer's first call: a bad target is refused at once, an unreachable server within
the connect timeout (see NOTE [ First contact ] in client/_channel.py).

Outages of a server that was reached are the RetryPolicy's (test_client_reconnect.py).
"""

from __future__ import annotations

import time

import pytest
from _serverproc import ServerProcess, free_port

from batchwire.client import (
    BatchClient,
    BatchwireError,
    ConnectError,
    RemoteDataset,
    TargetError,
)
from batchwire.client._channel import CONNECT_TIMEOUT_SECONDS_ENV, check_target

# The connect timeout is 5 s; the rest bounds a busy machine (it used to take ~32 s).
BOUND_SECONDS = 12.0


@pytest.mark.parametrize("call", ["iterate", "len", "describe"])
def test_first_call_to_no_server_says_cannot_reach(call: str) -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    ds = RemoteDataset(target, "dict", batch_size=4)
    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        if call == "iterate":
            next(iter(ds))
        elif call == "len":
            len(ds)
        else:
            ds.describe()
    assert time.monotonic() - started < BOUND_SECONDS
    assert str(caught.value).startswith(
        f"cannot reach {target}: is 'batchwire serve' running there?"
    )
    assert isinstance(caught.value, BatchwireError) and caught.value.target == target
    assert ds.state_dict()["batch"] == 0  # nothing was skipped


def test_connect_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONNECT_TIMEOUT_SECONDS_ENV, "1")
    ds = RemoteDataset(f"127.0.0.1:{free_port()}", "dict", batch_size=4, streams=2)
    started = time.monotonic()
    with pytest.raises(ConnectError, match=r"no connection within 1s"):
        next(iter(ds))
    assert time.monotonic() - started < 5


def test_connect_timeout_of_a_client() -> None:
    client = BatchClient(f"127.0.0.1:{free_port()}", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ConnectError, match=r"no connection within 0.5s"):
        client.list_datasets()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("localhost", "it has no port"),
        ("grpc://localhost:50051", "'grpc' is not a scheme gRPC knows"),
        ("http://localhost:50051", "'http' is not a scheme gRPC knows"),
        ("localhost:0", "'0' is not a port"),
        ("localhost:50051/x", "'50051/x' is not a port"),
        ("fe80::1:50051", "an IPv6 address needs brackets"),
        ("", "the target is empty"),
        ("dns:///", "names no address"),
    ],
)
def test_a_bad_target_is_refused_when_the_dataset_is_made(target: str, why: str) -> None:
    with pytest.raises(TargetError, match="a target looks like host:port") as caught:
        RemoteDataset(target, "dict", batch_size=4)
    assert why in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "target",
    [
        "localhost:50051",
        "10.0.0.1:50051",
        "my-host.example.com:1",
        "[::1]:50051",
        "dns:///localhost:50051",
        "dns://8.8.8.8/example.com:50051",
        "ipv4:10.0.0.1:50051,10.0.0.2:50051",
        "ipv6:[::1]:50051",
        "unix:/tmp/batchwire.sock",
        "unix:///tmp/batchwire.sock",
        "unix-abstract:batchwire",
    ],
)
def test_grpc_target_syntax_is_accepted(target: str) -> None:
    assert check_target(target) == target


def test_grpc_names_reach_a_real_server(core_server: ServerProcess) -> None:
    for target in (f"dns:///127.0.0.1:{core_server.port}", f"ipv4:127.0.0.1:{core_server.port}"):
        ds = RemoteDataset(target, "tuple", batch_size=25)
        assert len(ds) == 2
        assert [len(batch[0]) for batch in ds] == [25, 25]
