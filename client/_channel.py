"""gRPC channels and calls to a batchwire server, one channel per process and target.

See NOTE [ First contact ] for how an unreachable server is told from an outage.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc

from batchwire import allocator, compression, wire
from batchwire.client import _credentials, _shm
from batchwire.client._errors import ConnectError, ServerError
from batchwire.client._parallel import Stop
from batchwire.client._retry import StreamCutShort
from batchwire.client._targets import (
    Target,
    balancing_options,
    describe_target,
    grpc_target,
)
from batchwire.client._targets import check_target as check_target  # where it used to live
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger(__name__)
_SERVICE = "/batchwire.v1.BatchService/"
_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", 4 << 20),
    # Large windows keep multi-MiB chunks flowing at full speed over loopback and LAN.
    ("grpc.http2.lookahead_bytes", 16 << 20),
]

# Keepalive pings find a server host that vanished without a TCP reset (partition,
# power loss): without them a stream would wait for its next chunk forever. The
# server accepts pings every 5 s or more (server/app.py), with or without data.
KEEPALIVE_SECONDS_ENV = "BATCHWIRE_KEEPALIVE_SECONDS"
KEEPALIVE_TIMEOUT_SECONDS_ENV = "BATCHWIRE_KEEPALIVE_TIMEOUT_SECONDS"
KEEPALIVE_SECONDS = 20.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0

# NOTE [ First contact ]
# Until this process has once been connected to a target, a failure to connect is
# most likely a typo or a server that is not running, not an outage: it is
# reported within BATCHWIRE_CONNECT_TIMEOUT_SECONDS (5) as ConnectError, "cannot
# reach HOST:PORT: is 'batchwire serve' running there?", instead of DEADLINE_EXCEEDED
# after a call's full timeout or a RetryPolicy's whole budget (~32 s by default).
# Calls that a RetryPolicy retries (streams, CountBatches) still fail at once on a
# refused connection during the first half of that window, so that a policy with a
# small budget gives up with RetryError as it always did; after that they wait for
# the connection to the end of the window (the next attempt of an exponential
# backoff would come too late). "Connected" means the server answered a health
# probe (any status); once it has, the target is "reached" for good (forked
# children inherit that), and outages are the RetryPolicy's alone.
CONNECT_TIMEOUT_SECONDS_ENV = "BATCHWIRE_CONNECT_TIMEOUT_SECONDS"
CONNECT_TIMEOUT_SECONDS = 5.0

_lock = threading.Lock()
_links: dict[tuple[object, ...], _Link] = {}
_reached: set[str] = set()  # targets this process (or its parent before a fork) connected to


def connect_timeout() -> float:
    """Seconds to wait for a first connection (``BATCHWIRE_CONNECT_TIMEOUT_SECONDS``, 5)."""
    return _seconds(CONNECT_TIMEOUT_SECONDS_ENV, CONNECT_TIMEOUT_SECONDS)


def _seconds(variable: str, default: float) -> float:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{variable} should be a positive number of seconds, but got {raw!r}")
    return value


def keepalive_options() -> tuple[tuple[str, int], ...]:
    """Ping the server after ``BATCHWIRE_KEEPALIVE_SECONDS`` (20) of silence; drop the
    connection (a retryable UNAVAILABLE) when no answer comes within
    ``BATCHWIRE_KEEPALIVE_TIMEOUT_SECONDS`` (10)."""
    every = _seconds(KEEPALIVE_SECONDS_ENV, KEEPALIVE_SECONDS)
    timeout = _seconds(KEEPALIVE_TIMEOUT_SECONDS_ENV, KEEPALIVE_TIMEOUT_SECONDS)
    return (
        ("grpc.keepalive_time_ms", int(every * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout * 1000)),
        # grpc core (1.85) times a keepalive ping out by this one, not by the
        # keepalive timeout (grpc/grpc#39239); its default is a minute.
        ("grpc.http2.ping_timeout_ms", int(timeout * 1000)),
        # A stream's client sends no data after its request; without this, grpc
        # stops pinging after two pings and a long stall goes unnoticed again.
        ("grpc.http2.max_pings_without_data", 0),
    )


class _Link:
    """A channel, and its first-contact window (see NOTE [ First contact ])."""

    # Any answer of the server to this call, even UNIMPLEMENTED or UNAUTHENTICATED,
    # proves a connection; the standard health service answers without work.
    _PROBE = "/grpc.health.v1.Health/Check"

    def __init__(self, channel: grpc.Channel, open_probe) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._since: float | None = None  # start of the current first-contact window
        # The probe has a channel of its own, without health checking: a server that
        # answers NOT_SERVING (starting, draining) is reached all the same, while the
        # balanced channel would wait for it to turn SERVING (NOTE [ Replicas ] in _targets).
        self._open_probe = open_probe
        self._probe: grpc.Channel | None = None

    def _probe_channel(self) -> grpc.Channel:
        with self._lock:
            if self._probe is None:
                self._probe = self._open_probe()
            return self._probe

    def close(self) -> None:
        self._close_probe()
        self.channel.close()

    def _close_probe(self) -> None:
        with self._lock:
            probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()

    def wait_connected(
        self, target: str, timeout: float, *, fail_fast: bool, name: str | None = None
    ) -> None:
        """Returns once connected; raises ``ConnectError`` after ``timeout`` (see the NOTE).

        ``name``: how the error names the target (a list as given; default ``target``).

        ``fail_fast``: return early on a refused connection in the window's first
        half (the call then fails with UNAVAILABLE and its RetryPolicy backs off).
        """
        name = name or target
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
            since = self._since
        # A probe call in this thread, not a connectivity subscription: that would
        # keep a grpc polling thread running, and a fork (DataLoader workers) while
        # another thread is inside grpc can crash the child.
        now = time.monotonic()
        patient = not (fail_fast and now < since + timeout / 2)
        try:
            self._probe_channel().unary_unary(self._PROBE)(
                b"", timeout=max(since + timeout - now, 0.01), wait_for_ready=patient
            )
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                with self._lock:
                    self._since = None  # a later call gets a window of its own
                reason = self._reason()
                self._close_probe()
                raise ConnectError(name, timeout=timeout, reason=reason) from None
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                return  # refused (or said by a proxy): the call fails alike, and may be retried
        self._close_probe()
        if target not in _reached:
            _reached.add(target)
            log.debug("connected to %s after %.3fs", name, time.monotonic() - since)

    def _reason(self) -> str:
        """The channel's last connection error (e.g. "Connection refused"), if it has one."""
        try:
            self._probe_channel().unary_unary(self._PROBE)(b"", timeout=1.0, wait_for_ready=False)
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                return error.details() or "UNAVAILABLE"
        return "still connecting"


def close_channels() -> None:
    """Closes this process's cached channels; later calls open new ones.

    For a process done with its servers: a replica list's channel keeps a health
    watch open, and a channel to a server that went away keeps reconnecting, and a
    fork (DataLoader workers) while they are busy inside grpc may break the child's
    grpc (the tests close them between modules for that reason).
    """
    with _lock:
        mine = [key for key in _links if key[0] == os.getpid()]
        links = [_links.pop(key) for key in mine]
    for link in links:
        link.close()


def _link(target: str) -> _Link:
    keepalive = keepalive_options()
    key = (os.getpid(), target, _credentials.environment(), keepalive)
    with _lock:
        if key not in _links:
            _links[key] = _Link(
                _credentials.open_channel(
                    target, [*_OPTIONS, *balancing_options(target), *keepalive]
                ),
                lambda: _credentials.open_channel(target, _OPTIONS),
            )
        return _links[key]


def channel(target: Target) -> grpc.Channel:
    """The shared channel to ``target`` for this process (a forked child makes its own).

    TLS and token settings come from the environment (see ``_credentials``), and so
    do the keepalive settings (see ``keepalive_options``). Calls are balanced over
    the servers the target names (NOTE [ Replicas ] in _targets).
    """
    return _link(grpc_target(target)).channel


def wait_for_server(
    target: Target, timeout: float | None = None, *, fail_fast: bool = False
) -> None:
    """Returns at once if this process was ever connected to ``target``; else waits
    for a connection up to ``timeout`` (default ``connect_timeout()``) and raises
    ``ConnectError`` naming the target if none comes (see NOTE [ First contact ]).
    For several servers, one that answers is enough."""
    resolved = grpc_target(target)
    if resolved in _reached:
        return
    _link(resolved).wait_connected(
        resolved,
        connect_timeout() if timeout is None else timeout,
        fail_fast=fail_fast,
        name=describe_target(target),
    )


def _wait(client: BatchClient, *, fail_fast: bool) -> None:
    if client.target not in _reached:
        _link(client.target).wait_connected(
            client.target,
            connect_timeout() if client.connect_timeout is None else client.connect_timeout,
            fail_fast=fail_fast,
            name=client.name,
        )


class BatchObserver(Protocol):
    def batch(self, header: pb.BatchHeader, decode_seconds: float) -> None: ...


class BatchClient:
    """Typed calls to one server; errors become ``ServerError``.

    ``target`` is checked at once (``TargetError``); a server that this process
    never reached fails the first call within ``connect_timeout`` seconds
    (default ``BATCHWIRE_CONNECT_TIMEOUT_SECONDS``, 5) with ``ConnectError``.
    ``target`` may name several replicas (NOTE [ Replicas ] in _targets): each call goes to one.
    """

    def __init__(
        self, target: Target, *, timeout: float = 30.0, connect_timeout: float | None = None
    ) -> None:
        self.target = grpc_target(target)
        self.name = describe_target(target)  # the target as given, for messages
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def _unary(self, method: str, request, response_type, *, wait_for_ready: bool = True):
        _wait(self, fail_fast=not wait_for_ready)
        call = _link(self.target).channel.unary_unary(
            _SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return call(request, timeout=self.timeout, wait_for_ready=wait_for_ready)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error, self.name) from None

    def list_datasets(self) -> list[pb.DatasetInfo]:
        return list(
            self._unary("ListDatasets", pb.ListDatasetsRequest(), pb.ListDatasetsResponse).datasets
        )

    def describe(self, dataset: str, *, wait_for_ready: bool = True) -> pb.DatasetInfo:
        """``wait_for_ready=False``: fail fast (UNAVAILABLE) while the server is down."""
        return self._unary(
            "DescribeDataset",
            pb.DescribeDatasetRequest(dataset=dataset),
            pb.DatasetInfo,
            wait_for_ready=wait_for_ready,
        )

    def count_batches(self, request: pb.StreamBatchesRequest) -> pb.BatchCount:
        """Batches and samples of ``request``'s epoch (for every sampler kind).

        Fails fast (UNAVAILABLE) while the server is down, as a stream does, so
        that the caller's ``RetryPolicy`` rather than ``timeout`` bounds the wait.
        """
        return self._unary("CountBatches", request, pb.BatchCount, wait_for_ready=False)

    def transport(self, wanted: str, *, fail_fast: bool = False) -> _shm.Decision:
        """The path streams take: shared memory when proven usable (see ``_shm``), else bytes.

        ``fail_fast``: as a stream, UNAVAILABLE at once while the server is down (the
        stream's RetryPolicy waits), instead of waiting for a first connection.
        """
        if wanted != _shm.GRPC:
            wait_for_server(self.target, self.connect_timeout, fail_fast=fail_fast)
        return _shm.negotiate(
            channel(self.target), self.target, wanted, self.timeout, wait_for_ready=not fail_fast
        )

    def stream(self, request: pb.StreamBatchesRequest) -> grpc.Call:
        """Opens a StreamBatches call; iterate it for ``wire.Chunk`` objects.

        Unless the request says otherwise, small batches may arrive packed several
        to a message (``wire.BatchAssembler.feed`` unpacks them).
        """
        if not request.max_batches_per_message:
            packed = pb.StreamBatchesRequest()
            packed.CopyFrom(request)
            packed.max_batches_per_message = wire.MAX_BATCHES_PER_MESSAGE
            request = packed
        _wait(self, fail_fast=True)
        if not request.shared_memory_nonce:  # bytes arrive: reuse their freed memory (once)
            allocator.keep_message_memory()
        call = _link(self.target).channel.unary_stream(
            _SERVICE + "StreamBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
            response_deserializer=wire.parse_chunk,
        )
        return call(request)

    def batches(
        self,
        request: pb.StreamBatchesRequest,
        observer: BatchObserver | None = None,
        stop: Stop | None = None,
    ) -> Iterator[tuple[int, object]]:
        """Yields ``(batch_index, batch)`` for one stream; raises ``ServerError`` if it fails.

        ``observer.batch(header, decode_seconds)`` hears of each batch (see ``_stats``).
        ``stop``: setting it (from another thread) cancels the call.

        The call is cancelled only once the stream is over, its consumer went away
        or ``stop`` was set, so a CANCELLED status raised here while ``stop`` is
        unset is never the client's own doing.
        """
        call = self.stream(request)
        unhook = stop.on_set(call.cancel) if stop is not None else None
        mapper = _shm.PayloadMapper(self.target) if request.shared_memory_nonce else None
        assembler = wire.BatchAssembler(compression.decompress, mapper)
        try:
            for chunk in call:
                decoding = time.perf_counter()
                for header, batch in assembler.feed(chunk):
                    if observer is not None:
                        observer.batch(header, time.perf_counter() - decoding)
                    yield header.batch_index, batch
                    decoding = time.perf_counter()
            if assembler.pending:
                raise StreamCutShort(
                    "the stream ended without an error in the middle of a batch", target=self.name
                )
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error, self.name) from None
        finally:
            if unhook is not None:
                unhook()
            call.cancel()
            if mapper is not None:
                mapper.close()
