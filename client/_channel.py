"""gRPC channels and calls to a batchwire server, one channel per process and target.

See NOTE [ First contact ] for how an unreachable server is told from an outage.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import grpc

from batchwire import compression, wire
from batchwire.client import _credentials
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

# NOTE [ Replicas ]
# A target may name several servers with the same config (a list of host:port,
# a DNS name with many addresses such as a Kubernetes headless Service, or
# ipv4:a:p,b:p). gRPC's round_robin policy keeps a connection to each and gives
# every call (one stream, one CountBatches) to the next ready one, so a rank's
# `streams=k` spread over the replicas. Client-side health checking watches each
# replica's grpc.health.v1 status for the batch service and skips those that say
# NOT_SERVING (starting, draining, a failed worker pool). A replica lost
# mid-stream is a retryable UNAVAILABLE: the stream resumes at its owed batch on
# the next ready replica (_resume). The DatasetInfo fingerprint keeps replicas
# with different configs from being mixed (RemoteDataset).
# A DNS name is resolved again when a connection ends (a server's
# max_connection_age, a replica gone), at most every DNS_MIN_RESOLVE_SECONDS, so
# replicas that joined receive streams; a list is fixed when the channel opens.
# A target that can only be one server (an IP address or localhost, and a port) is
# not health-checked: a call then reaches it whatever it reports, and fails with its
# own message ("starting", "resume at batch N on another server") rather than
# gRPC's "backend unhealthy".
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "batchwire.v1.BatchService"},
    }
)
ONE_SERVER_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
DNS_MIN_RESOLVE_SECONDS = 5.0


def _balancing(target: str) -> list[tuple[str, object]]:
    """Channel options of NOTE [ Replicas ] for a gRPC target string."""
    match = _HOST_PORT.fullmatch(target)
    one = target.startswith(("unix:", "unix-abstract:", "vsock:")) or (
        match is not None and _one_host(match["host"])
    )
    return [
        ("grpc.service_config", ONE_SERVER_CONFIG if one else SERVICE_CONFIG),
        ("grpc.service_config_disable_resolution", 1),  # never a service config from DNS TXT
        ("grpc.dns_min_time_between_resolutions_ms", int(DNS_MIN_RESOLVE_SECONDS * 1000)),
    ]


def _one_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name: DNS may give several addresses (compose --scale, a headless Service)
    return True


Target = str | Sequence[str]
"""One ``host:port``, a list of them (or one string of them, comma-separated), or a gRPC name."""

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
    "host:port (localhost:50051), [::1]:50051, a list of them (replicas), or a gRPC "
    "name such as dns:///host:port, ipv4:10.0.0.1:50051,10.0.0.2:50051 or unix:/path/to/socket"
)


def grpc_target(target: Target) -> str:
    """The gRPC target string for ``target``; raises ``TargetError`` naming a bad entry.

    A list of ``host:port`` (a Python sequence, or one string with commas and
    no scheme) becomes ``ipv4:a:p,b:p`` (or ``ipv6:``): one channel, balanced
    round robin. Host names in a list are resolved once, here (IPv4 preferred);
    give a ``dns:///`` name to have them re-resolved. With TLS, set
    ``BATCHWIRE_TLS_SERVER_NAME`` for a list: the certificate cannot be checked
    against an address.
    """
    if isinstance(target, str):
        if len(list_entries(target)) == 1:
            return check_target(target)
        entries = list_entries(target)
    elif isinstance(target, Sequence) and not isinstance(target, bytes):
        entries = list(target)
    else:
        raise TargetError(f"a target should be a string or a list of them, but got {target!r}")
    if not entries:
        raise TargetError(f"the target list is empty; a target looks like {TARGET_FORMS}")
    for i, entry in enumerate(entries):
        try:
            if not isinstance(entry, str) or not _HOST_PORT.fullmatch(check_target(entry)):
                raise TargetError(f"{entry!r} is not host:port")
        except TargetError as error:
            raise TargetError(
                f"bad target list {target!r}: entry {i} ({entry!r}): {error}; "
                "a list holds host:port entries such as 10.0.0.1:50051"
            ) from None
    if len(entries) == 1:
        return entries[0]
    return _address_list(entries)


def list_entries(target: str) -> list[str]:
    """The servers of a comma-separated list (``a:1,b:2``); any other target is one entry."""
    if "," not in target or target.partition(":")[0] in _SCHEMES:
        return [target]
    return [entry.strip() for entry in target.split(",")]


def _address_list(entries: list[str]) -> str:
    """``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,...``) for host:port entries, resolving host names."""
    families: list[dict[int, str]] = []
    for entry in entries:
        match = _HOST_PORT.fullmatch(entry)
        host, port = match["host"].strip("[]"), match["port"]
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TargetError(
                f"cannot resolve {host!r} of the target list entry {entry!r}: {exc}"
            ) from None
        found: dict[int, str] = {}
        for family, _, _, _, address in infos:
            found.setdefault(family, address[0])
        families.append(
            {f: (a if f == socket.AF_INET else f"[{a}]") + f":{port}" for f, a in found.items()}
        )
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        if all(family in found for found in families):
            return scheme + ":" + ",".join(found[family] for found in families)
    raise TargetError(
        f"the target list {entries!r} mixes IPv4-only and IPv6-only servers; "
        "gRPC balances over one address family"
    )


def describe_target(target: Target) -> str:
    """How errors name ``target``: a list as its entries, comma-separated."""
    if isinstance(target, str):
        return target
    return ", ".join(str(entry) for entry in target)


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

    def __init__(self, channel: grpc.Channel, open_probe) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._since: float | None = None  # start of the current first-contact window
        # The probe has a channel of its own, without health checking: a server that
        # answers NOT_SERVING (starting, draining) is reached all the same, while the
        # balanced channel would wait for it to turn SERVING (NOTE [ Replicas ]).
        self._open_probe = open_probe
        self._probe: grpc.Channel | None = None

    def _probe_channel(self) -> grpc.Channel:
        with self._lock:
            if self._probe is None:
                self._probe = self._open_probe()
            return self._probe

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


def _link(target: str) -> _Link:
    keepalive = keepalive_options()
    key = (os.getpid(), target, _credentials.environment(), keepalive)
    with _lock:
        if key not in _links:
            _links[key] = _Link(
                _credentials.open_channel(target, [*_OPTIONS, *_balancing(target), *keepalive]),
                lambda: _credentials.open_channel(target, _OPTIONS),
            )
        return _links[key]


def channel(target: Target) -> grpc.Channel:
    """The shared channel to ``target`` for this process (a forked child makes its own).

    TLS and token settings come from the environment (see ``_credentials``), and so
    do the keepalive settings (see ``keepalive_options``). Calls are balanced over
    the servers the target names (NOTE [ Replicas ]).
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
    ``target`` may name several replicas (NOTE [ Replicas ]): each call goes to one.
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
        call = _link(self.target).channel.unary_stream(
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
        assembler = wire.BatchAssembler(compression.decompress)
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
            call.cancel()
