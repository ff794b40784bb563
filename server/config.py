"""Reads the server's TOML config into frozen dataclasses, checking every key.

A bad config stops ``serve`` at start-up: every error names the file, the
dotted key and the reason, e.g.
``digits.toml: datasets.digits.length: expected a positive integer, got -3``.
Source-specific keys are checked by the source (see ``sources/``), through the
same ``Table`` reader so that their errors read alike.
"""

from __future__ import annotations

import grp
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MISSING = object()


class ConfigError(ValueError):
    """A config file that cannot be served, with the file, key and reason."""

    def __init__(self, file: str | os.PathLike[str], key: str, reason: str) -> None:
        self.file = str(file)
        self.key = key
        self.reason = reason
        super().__init__(f"{self.file}: {key}: {reason}" if key else f"{self.file}: {reason}")


class Table:
    """A TOML table that knows where it sits, for errors that name the key."""

    def __init__(self, data: Mapping[str, Any], *, file: Path, prefix: str) -> None:
        self.data = data
        self.file = file
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), reason)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        """Returns ``data[name]`` after checking its type; raises if required and missing."""
        if name not in self.data:
            if default is _MISSING:
                raise self.error(name, "required key is missing")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, but `workers = true` is a mistake.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(_type_name(k) for k in kinds)
            raise self.error(name, f"expected {names}, got {_type_name(type(value))} {value!r}")
        return value

    def positive_int(self, name: str, default: Any = _MISSING) -> int:
        value = self.get(name, int, default)
        if value is not None and value <= 0:
            raise self.error(name, f"expected a positive integer, got {value}")
        return value

    def table(self, name: str, default: Any = _MISSING) -> Table:
        data = self.get(name, dict, default)
        return Table(data if data is not None else {}, file=self.file, prefix=self.key(name))

    def choice(
        self, name: str, options: Mapping[str, Any] | list[str], default: Any = _MISSING
    ) -> str:
        value = self.get(name, str, default)
        if value not in options:
            raise self.error(
                name, f"unknown value {value!r}; expected one of {', '.join(sorted(options))}"
            )
        return value

    def path(self, name: str, default: Any = _MISSING, *, must_exist: bool = True) -> Path | None:
        """A file path, relative to the config file's folder."""
        value = self.get(name, str, default)
        if value is None:
            return None
        resolved = (self.file.parent / value).resolve()
        if must_exist and not resolved.exists():
            raise self.error(name, f"file not found: {resolved}")
        return resolved

    def reject_unknown(self, known: set[str]) -> None:
        for name in self.data:
            if name not in known:
                raise self.error(name, f"unknown key; expected one of {', '.join(sorted(known))}")


def _type_name(kind: type) -> str:
    return {dict: "table", list: "array", str: "string", int: "integer", float: "number"}.get(
        kind, kind.__name__
    )


@dataclass(frozen=True)
class TlsConfig:
    """The ``[server.tls]`` table: serve over TLS, optionally requiring client certificates."""

    cert: str
    """PEM certificate chain of the server."""
    key: str
    """PEM private key of the server."""
    client_ca: str = ""
    """PEM CA bundle that client certificates must chain to (enables mutual TLS)."""
    require_client_cert: bool = False
    """Refuse clients without a certificate signed by ``client_ca``."""


@dataclass(frozen=True)
class AuthConfig:
    """The ``[server.auth]`` table: bearer tokens accepted in the ``authorization`` header."""

    tokens_file: str = ""
    """A file with one token per line (blank lines and # comments ignored)."""
    tokens_env: str = ""
    """An environment variable holding tokens, comma-separated."""


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table."""

    host: str = "127.0.0.1"
    """Address to bind; "0.0.0.0" to serve other machines."""
    port: int = 50051
    """Port to bind; 0 picks a free one (printed at start-up)."""
    executor: str = "local"
    """What builds the batches: "local" (worker processes on this machine) or "ray" (actors
    of a Ray cluster, ``workers`` of them; needs ``batchwire[ray]``); see executor.py."""
    ray_address: str = ""
    """executor = "ray": "auto", a ``ray://`` address, or empty for a Ray started by the server."""
    ray_num_cpus: int = 0
    """CPUs of a Ray started by the server (0: all of this machine's)."""
    ray_actor_cpus: float = 1.0
    """CPUs each actor reserves on the cluster."""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Worker processes that load, transform and collate batches."""
    max_batch_size: int = 65536
    """Largest batch_size a request may ask for."""
    prefetch_batches: int = 4
    """Batches built ahead of each stream (bounds server memory per stream)."""
    chunk_bytes: int = 4 << 20
    """Largest payload slice in one gRPC message."""
    max_concurrent_streams: int = 64
    """Open streams beyond this are refused with RESOURCE_EXHAUSTED."""
    python_path: tuple[str, ...] = ()
    """Folders (relative to the config file) added to sys.path for `python` sources."""
    shm_dir: str = ""
    """Where workers put finished batches; default /dev/shm."""
    shm_group: str = ""
    """A group whose members may map batches too (objects 0640 of that group); empty:
    the server's user only (0600). See ``shm_delivery``."""
    max_batch_bytes: int = 1 << 30
    """A batch larger than this ends its stream with RESOURCE_EXHAUSTED."""
    max_message_bytes: int = 64 << 20
    """Largest gRPC message the server sends or accepts."""
    plan_cache_bytes: int = 512 << 20
    """Batch plans kept between requests, all datasets together (0: only those streams hold).

    512 MiB: 64 epochs of a million samples (8 bytes each); see ``plan_cache``."""
    shared_builds_bytes: int = 64 << 20
    """Built batches kept for identical streams that have not taken them yet, all streams
    together (0: only builds in flight are shared); see ``shared_builds``."""
    keepalive_seconds: float = 30.0
    """Ping an idle connection this often, to detect dead peers on long streams."""
    keepalive_timeout_seconds: float = 10.0
    """A ping unanswered this long closes the connection."""
    grace_seconds: float = 10.0
    """On SIGTERM, open streams get this long before they end with UNAVAILABLE."""
    max_connection_age_seconds: float = 0.0
    """End client connections older than this (gRPC GOAWAY; 0: never), so that clients
    re-resolve their target and spread onto replicas that joined since."""
    max_connection_age_grace_seconds: float = 10.0
    """Streams of a connection past its age go on this long, then end UNAVAILABLE (and resume)."""
    task_timeout_seconds: float = 300.0
    """A worker building one batch longer than this is killed and replaced; the batch fails."""
    metrics_port: int | None = None
    """Port of the Prometheus endpoint (0: a free one); none when unset."""
    metrics_host: str = ""
    """Address of the Prometheus endpoint; defaults to ``host``."""
    summary_seconds: float = 60.0
    """Log a one-line summary of throughput, worker busy %, queue depth and build times
    this often (0: never)."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR; ``--log-level`` overrides."""
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None


PIPELINE_KEYS = ("transforms", "sampler", "collate")
"""Keys of a ``[datasets.NAME]`` table that belong to the pipeline, not to the source."""


@dataclass(frozen=True)
class DatasetConfig:
    """One ``[datasets.NAME]`` table; ``options`` are the source's own keys.

    ``pipeline`` holds the raw ``transforms``, ``sampler`` and ``collate``
    values, checked by ``batchwire.server.pipeline`` (which knows what they mean).
    """

    name: str
    source: str
    options: Mapping[str, Any]
    pipeline: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    file: Path
    server: ServerConfig
    datasets: Mapping[str, DatasetConfig]


_SERVER_KEYS = set(ServerConfig.__dataclass_fields__)
_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
EXECUTORS = ["local", "ray"]
"""The values of ``[server] executor`` (``executor.make_executor`` builds each)."""


def load_config(path: str | os.PathLike[str]) -> Config:
    """Parses and checks a config file; raises ``ConfigError`` naming file, key and reason."""
    file = Path(path).resolve()
    try:
        with file.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(file, "", "config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from None
    root = Table(data, file=file, prefix="")
    root.reject_unknown({"server", "datasets"})
    server = _server_config(root.table("server", {}))
    datasets_table = root.table("datasets")
    datasets = {}
    for name in datasets_table.data:
        table = datasets_table.table(name)
        source = table.get("source", str)
        options = {
            key: value
            for key, value in table.data.items()
            if key != "source" and key not in PIPELINE_KEYS
        }
        pipeline = {key: table.data[key] for key in PIPELINE_KEYS if key in table.data}
        datasets[name] = DatasetConfig(name, source, options, pipeline)
    if not datasets:
        raise ConfigError(file, "datasets", "no datasets declared; add a [datasets.NAME] table")
    return Config(file=file, server=server, datasets=datasets)


HEADER_ROOM = 1 << 20
"""Message bytes kept free beside a chunk's payload for its header."""


def _server_config(table: Table) -> ServerConfig:
    table.reject_unknown(_SERVER_KEYS)
    defaults = ServerConfig()
    python_path = table.get("python_path", list, [])
    for i, entry in enumerate(python_path):
        if not isinstance(entry, str):
            raise table.error(f"python_path[{i}]", f"expected string, got {entry!r}")
    chunk_bytes = table.positive_int("chunk_bytes", defaults.chunk_bytes)
    max_message_bytes = table.positive_int("max_message_bytes", defaults.max_message_bytes)
    if chunk_bytes + HEADER_ROOM > max_message_bytes:
        raise table.error(
            "chunk_bytes",
            f"{chunk_bytes} leaves no room for a {HEADER_ROOM}-byte header within "
            f"max_message_bytes={max_message_bytes}; lower chunk_bytes or raise max_message_bytes",
        )
    return ServerConfig(
        host=table.get("host", str, defaults.host),
        port=_port(table, defaults.port, "port"),
        executor=table.choice("executor", EXECUTORS, defaults.executor),
        ray_address=table.get("ray_address", str, defaults.ray_address),
        ray_num_cpus=_non_negative_int(table, "ray_num_cpus", defaults.ray_num_cpus),
        ray_actor_cpus=_positive_number(table, "ray_actor_cpus", defaults.ray_actor_cpus),
        workers=table.positive_int("workers", defaults.workers),
        max_batch_size=table.positive_int("max_batch_size", defaults.max_batch_size),
        prefetch_batches=table.positive_int("prefetch_batches", defaults.prefetch_batches),
        chunk_bytes=chunk_bytes,
        max_concurrent_streams=table.positive_int(
            "max_concurrent_streams", defaults.max_concurrent_streams
        ),
        python_path=tuple(str((table.file.parent / p).resolve()) for p in python_path),
        shm_dir=table.get("shm_dir", str, defaults.shm_dir),
        shm_group=_group(table, "shm_group", defaults.shm_group),
        max_batch_bytes=table.positive_int("max_batch_bytes", defaults.max_batch_bytes),
        max_message_bytes=max_message_bytes,
        plan_cache_bytes=_non_negative_int(table, "plan_cache_bytes", defaults.plan_cache_bytes),
        shared_builds_bytes=_non_negative_int(
            table, "shared_builds_bytes", defaults.shared_builds_bytes
        ),
        keepalive_seconds=_positive_number(table, "keepalive_seconds", defaults.keepalive_seconds),
        keepalive_timeout_seconds=_positive_number(
            table, "keepalive_timeout_seconds", defaults.keepalive_timeout_seconds
        ),
        grace_seconds=_positive_number(
            table, "grace_seconds", defaults.grace_seconds, allow_zero=True
        ),
        max_connection_age_seconds=_positive_number(
            table,
            "max_connection_age_seconds",
            defaults.max_connection_age_seconds,
            allow_zero=True,
        ),
        max_connection_age_grace_seconds=_positive_number(
            table,
            "max_connection_age_grace_seconds",
            defaults.max_connection_age_grace_seconds,
            allow_zero=True,
        ),
        task_timeout_seconds=_positive_number(
            table, "task_timeout_seconds", defaults.task_timeout_seconds
        ),
        metrics_port=_port(table, None, "metrics_port"),
        metrics_host=table.get("metrics_host", str, defaults.metrics_host),
        summary_seconds=_positive_number(
            table, "summary_seconds", defaults.summary_seconds, allow_zero=True
        ),
        log_level=table.choice("log_level", _LOG_LEVELS, defaults.log_level),
        tls=_tls_config(table.table("tls")) if "tls" in table.data else None,
        auth=_auth_config(table.table("auth")) if "auth" in table.data else None,
    )


def _group(table: Table, name: str, default: str) -> str:
    group = table.get(name, str, default)
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise table.error(name, f"no group {group!r} on this host") from None
    return group


def _non_negative_int(table: Table, name: str, default: int) -> int:
    value = table.get(name, int, default)
    if value < 0:
        raise table.error(name, f"expected a non-negative integer, got {value}")
    return value


def _positive_number(table: Table, name: str, default: float, *, allow_zero: bool = False) -> float:
    value = float(table.get(name, float, default))
    if value < 0 or (value == 0 and not allow_zero):
        raise table.error(name, f"expected a positive number of seconds, got {value}")
    return value


def _tls_config(table: Table) -> TlsConfig:
    table.reject_unknown(set(TlsConfig.__dataclass_fields__))
    client_ca = table.path("client_ca", None)
    require = table.get("require_client_cert", bool, False)
    if require and client_ca is None:
        raise table.error(
            "require_client_cert",
            "mutual TLS needs client_ca, the CA that signs client certificates",
        )
    return TlsConfig(
        cert=str(table.path("cert")),
        key=str(table.path("key")),
        client_ca=str(client_ca or ""),
        require_client_cert=require,
    )


def _auth_config(table: Table) -> AuthConfig:
    table.reject_unknown(set(AuthConfig.__dataclass_fields__))
    tokens_file = table.path("tokens_file", None)
    tokens_env = table.get("tokens_env", str, "")
    if tokens_file is None and not tokens_env:
        raise table.error("tokens_file", "give tokens_file or tokens_env (or remove [server.auth])")
    if tokens_env and tokens_env not in os.environ:
        raise table.error("tokens_env", f"environment variable {tokens_env} is not set")
    return AuthConfig(tokens_file=str(tokens_file or ""), tokens_env=tokens_env)


def _port(table: Table, default: int | None, name: str) -> int | None:
    port = table.get(name, int, default)
    if port is not None and not 0 <= port <= 65535:
        raise table.error(name, f"expected 0..65535, got {port}")
    return port
