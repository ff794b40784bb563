"""Targets: one server, replicas (a list), or a gRPC name; and how a channel balances over them.

See NOTE [ Replicas ].
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Sequence

from batchwire.client._errors import TargetError

# gRPC name schemes (https://grpc.github.io/grpc/core/md_doc_naming.html): taken as they are.
_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.%\w-]+\]|[\w.-]+):(?P<port>\d+)")
TARGET_FORMS = (
    "host:port (localhost:50051), [::1]:50051, a list of them (replicas), or a gRPC "
    "name such as dns:///host:port, ipv4:10.0.0.1:50051,10.0.0.2:50051 or unix:/path/to/socket"
)

Target = str | Sequence[str]
"""One ``host:port``, a list of them (or one string of them, comma-separated), or a gRPC name."""


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


def balancing_options(target: str) -> list[tuple[str, object]]:
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
