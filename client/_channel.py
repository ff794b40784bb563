"""gRPC channels and calls to a batchwire server, one channel per process and target.

See NOTE [ First contact ] for how an unreachable server is told from an outage.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc

from batchwire import compression, wire
from batchwire.client import _credentials, _shm
from batchwire.client._errors import ConnectError, ServerError, TargetError
from batchwire.client._retry import StreamCutShort
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

# gRPC name schemes (https://grpc.github.io/grpc/core/md_doc_naming.html): taken as they are.
_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.%\w-]+\]|[\w.-]+):(?P<port>\d+)")
TARGET_FORMS = (
    "host:port (localhost:50051), [::1]:50051, or a gRPC name such as "
    "dns:///host:port, ipv4:10.0.0.1:50051,10.0.0.2:50051 or unix:/path/to/socket"
)


def check_target(target: str) -> str:
    """Returns ``target`` if gRPC can parse it; raises ``TargetError`` saying why not.

    Bare ``host:port`` needs the port (gRPC would silently take 443) and brackets
    around an IPv6 address; a URI's scheme must be one gRPC resolves (an unknown
    one, such as ``grpc://``, would be resolved as a host name and never connect).
    """
    if not isinstance(target, str) or not target.strip():
        raise TargetError(f"the target is empty; a target looks like {TARGET_FORMS}")
    scheme, colon, rest = target.partition(":")
    if colon and scheme in _SCHEMES and not rest.isdigit():
        if not rest.strip("/"):
            raise TargetError(
                f"target {target!r} names no address; a target looks like {TARGET_FORMS}"
            )
        return target
    match = _HOST_PORT.fullmatch(target)
    if match and 0 < int(match["port"]) < 65536:
        return target
    if "://" in target:
        why = f"{scheme!r} is not a scheme gRPC knows ({', '.join(sorted(_SCHEMES))})"
    elif not colon:
        why = "it has no port"
    elif target.count(":") > 1 and not target.startswith("["):
        why = "an IPv6 address needs brackets, as in [::1]:50051"
    else:
        why = f"{target.rpartition(':')[2]!r} is not a port (1-65535)"
    raise TargetError(f"bad target {target!r}: {why}; a target looks like {TARGET_FORMS}")


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

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._since: float | None = None  # start of the current first-contact window

    def wait_connected(self, target: str, timeout: float, *, fail_fast: bool) -> None:
        """Returns once connected; raises ``ConnectError`` after ``timeout`` (see the NOTE).

        ``fail_fast``: return early on a refused connection in the window's first
        half (the call then fails with UNAVAILABLE and its RetryPolicy backs off).
        """
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
            self.channel.unary_unary(self._PROBE)(
                b"", timeout=max(since + timeout - now, 0.01), wait_for_ready=patient
            )
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                with self._lock:
                    self._since = None  # a later call gets a window of its own
                raise ConnectError(target, timeout=timeout, reason=self._reason()) from None
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                return  # refused (or said by a proxy): the call fails alike, and may be retried
        if target not in _reached:
            _reached.add(target)
            log.debug("connected to %s after %.3fs", target, time.monotonic() - since)

    def _reason(self) -> str:
        """The channel's last connection error (e.g. "Connection refused"), if it has one."""
        try:
            self.channel.unary_unary(self._PROBE)(b"", timeout=1.0, wait_for_ready=False)
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                return error.details() or "UNAVAILABLE"
        return "still connecting"


def _link(target: str) -> _Link:
    keepalive = keepalive_options()
    key = (os.getpid(), target, _credentials.environment(), keepalive)
    with _lock:
        if key not in _links:
            _links[key] = _Link(_credentials.open_channel(target, [*_OPTIONS, *keepalive]))
        return _links[key]


def channel(target: str) -> grpc.Channel:
    """The shared channel to ``target`` for this process (a forked child makes its own).

    TLS and token settings come from the environment (see ``_credentials``), and so
    do the keepalive settings (see ``keepalive_options``).
    """
    return _link(check_target(target)).channel


def wait_for_server(target: str, timeout: float | None = None, *, fail_fast: bool = False) -> None:
    """Returns at once if this process was ever connected to ``target``; else waits
    for a connection up to ``timeout`` (default ``connect_timeout()``) and raises
    ``ConnectError`` naming the target if none comes (see NOTE [ First contact ])."""
    if target in _reached:
        return
    _link(check_target(target)).wait_connected(
        target, connect_timeout() if timeout is None else timeout, fail_fast=fail_fast
    )


class BatchObserver(Protocol):
    def batch(self, header: pb.BatchHeader, decode_seconds: float) -> None: ...


class BatchClient:
    """Typed calls to one server; errors become ``ServerError``.

    ``target`` is checked at once (``TargetError``); a server that this process
    never reached fails the first call within ``connect_timeout`` seconds
    (default ``BATCHWIRE_CONNECT_TIMEOUT_SECONDS``, 5) with ``ConnectError``.
    """

    def __init__(
        self, target: str, *, timeout: float = 30.0, connect_timeout: float | None = None
    ) -> None:
        self.target = check_target(target)
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def _unary(self, method: str, request, response_type, *, wait_for_ready: bool = True):
        wait_for_server(self.target, self.connect_timeout, fail_fast=not wait_for_ready)
        call = channel(self.target).unary_unary(
            _SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return call(request, timeout=self.timeout, wait_for_ready=wait_for_ready)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error, self.target) from None

    def list_datasets(self) -> list[pb.DatasetInfo]:
        return list(
            self._unary("ListDatasets", pb.ListDatasetsRequest(), pb.ListDatasetsResponse).datasets
        )

    def describe(self, dataset: str) -> pb.DatasetInfo:
        return self._unary(
            "DescribeDataset", pb.DescribeDatasetRequest(dataset=dataset), pb.DatasetInfo
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
        wait_for_server(self.target, self.connect_timeout, fail_fast=True)
        call = channel(self.target).unary_stream(
            _SERVICE + "StreamBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
            response_deserializer=wire.parse_chunk,
        )
        return call(request)

    def batches(
        self, request: pb.StreamBatchesRequest, observer: BatchObserver | None = None
    ) -> Iterator[tuple[int, object]]:
        """Yields ``(batch_index, batch)`` for one stream; raises ``ServerError`` if it fails.

        ``observer.batch(header, decode_seconds)`` hears of each batch (see ``_stats``).

        The call is cancelled only once the stream is over or its consumer went
        away, so a CANCELLED status raised here is never the client's own doing.
        """
        call = self.stream(request)
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
                    "the stream ended without an error in the middle of a batch", target=self.target
                )
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error, self.target) from None
        finally:
            call.cancel()
            if mapper is not None:
                mapper.close()
