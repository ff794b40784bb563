"""Where a trainer's time goes: waiting for the next batch, or computing between batches.

A ``RemoteDataset`` pass times how long the training loop waited inside
``next()`` (data wait) and how long it spent between two batches (compute),
counts batches, bytes and reconnects, and adds up what the server reports per
batch (``BatchHeader.build_seconds``, ``wait_seconds``: how long its stream
waited on a worker). ``ds.stats()`` returns the figures (live during a pass);
at the end of each pass one log line says the data-wait share and, above
``DATA_WAIT_THRESHOLD``, the likely bottleneck:

* server workers busy: the server's stream waited on its workers for most of
  the trainer's wait (more workers, or a faster dataset, would help);
* client decode: the trainer spent most of the wait decompressing and
  assembling batches;
* network: neither: the server had batches ready and the bytes were in flight.

Optional Prometheus metrics (``enable_metrics()``, off by default) export the
same counters from the trainer process.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger("batchwire.client")

DATA_WAIT_THRESHOLD = 0.2
"""Above this share of step time waiting for data, the epoch's log line names a bottleneck."""

WORKERS, DECODE, NETWORK, COMPUTE = (
    "server workers busy",
    "client decode",
    "network",
    "training loop compute",
)


@dataclass(frozen=True)
class StreamStats:
    """One pass (epoch) of a ``RemoteDataset`` as the trainer saw it; seconds are wall time."""

    dataset: str
    epoch: int | None
    batches: int = 0
    bytes: int = 0  # payload bytes received (compressed size when compressed)
    wait_seconds: float = 0.0  # the loop waited in next() for a batch
    compute_seconds: float = 0.0  # the loop ran between two batches
    decode_seconds: float = 0.0  # of the wait: decompressing and assembling batches
    server_wait_seconds: float = 0.0  # server-reported: its stream waited on its workers
    build_seconds: float = 0.0  # server-reported: worker time building these batches
    reconnects: int = 0
    transport: str = ""

    @property
    def data_wait_fraction(self) -> float:
        """Share of step time (wait + compute) spent waiting for data; 0 before any batch."""
        step = self.wait_seconds + self.compute_seconds
        return self.wait_seconds / step if step > 0 else 0.0

    @property
    def bottleneck(self) -> str:
        """The likely bottleneck: the loop's compute below the threshold, else what the wait was."""
        if self.data_wait_fraction <= DATA_WAIT_THRESHOLD:
            return COMPUTE
        return max(self._wait_shares().items(), key=lambda item: item[1])[0]

    def _wait_shares(self) -> dict[str, float]:
        wait = max(self.wait_seconds, 1e-9)
        workers = min(self.server_wait_seconds, wait)
        decode = min(self.decode_seconds, wait - workers)
        return {
            WORKERS: workers / wait,
            DECODE: decode / wait,
            NETWORK: 1 - (workers + decode) / wait,
        }

    def line(self) -> str:
        """The epoch's log line: "data wait 3% of step time ..."."""
        what = f"dataset {self.dataset!r}" + ("" if self.epoch is None else f" epoch {self.epoch}")
        text = (
            f"{what}: data wait {self.data_wait_fraction:.0%} of step time "
            f"(waited {self.wait_seconds:.2f} s, computed {self.compute_seconds:.2f} s; "
            f"{self.batches} batches, {_size(self.bytes)}, {self.reconnects} reconnects, "
            f"{self.transport})"
        )
        bottleneck = self.bottleneck
        if bottleneck == COMPUTE:
            return f"{text}; bottleneck: {COMPUTE}, data keeps up"
        shares = self._wait_shares()
        detail = ", ".join(f"{name} {share:.0%}" for name, share in shares.items())
        advice = {
            WORKERS: "more server workers or a faster dataset would help",
            DECODE: "compression costs more than it saves here, or the trainer's CPU is busy",
            NETWORK: "the server had batches ready; more streams or compression may help",
        }[bottleneck]
        return f"{text}; bottleneck: {bottleneck} (of the wait: {detail}); {advice}"


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def transport(target: str, compression: int) -> str:
    """How batches travel: "grpc/tcp", "grpc/unix+tls, lz4", ..."""
    kind = "unix" if target.startswith("unix:") else "tcp"
    tls = "+tls" if os.environ.get("BATCHWIRE_TLS_CA") else ""
    codec = "" if compression == pb.NONE else f", {pb.Compression.Name(compression).lower()}"
    return f"grpc/{kind}{tls}{codec}"


_FIELDS = (
    "batches",
    "bytes",
    "wait_seconds",
    "compute_seconds",
    "decode_seconds",
    "server_wait_seconds",
    "build_seconds",
    "reconnects",
)


class StatsRecorder:
    """Collects one ``RemoteDataset``'s figures; fed from the loop's and the streams' threads.

    Plain counters under a lock (a few hundred nanoseconds a batch): a ``StreamStats``
    is made only when asked for.
    """

    def __init__(self, dataset: str, transport: str) -> None:
        self._lock = threading.Lock()
        self._dataset, self._transport = dataset, transport
        self._epoch: int | None = None
        self._counts = dict.fromkeys(_FIELDS, 0)
        self._unreported: StreamStats | None = None  # a finished pass the server has not heard of

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker gets its own lock
        state = self.__dict__.copy()
        del state["_lock"]
        state["_unreported"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def set_transport(self, transport: str) -> None:
        """The path batches take, once known ("shm", or the gRPC one given at first)."""
        with self._lock:
            self._transport = transport

    def stats(self) -> StreamStats:
        with self._lock:
            return StreamStats(
                self._dataset, self._epoch, transport=self._transport, **self._counts
            )

    def begin(self, epoch: int) -> None:
        with self._lock:
            self._epoch = epoch
            self._counts = dict.fromkeys(_FIELDS, 0)

    def _add(self, key: str, value: float) -> None:
        with self._lock:
            self._counts[key] += value
        if _exported is not None:
            _exported.add(self._dataset, {key: value})

    def waited(self, seconds: float) -> None:
        self._add("wait_seconds", seconds)

    def computed(self, seconds: float) -> None:
        self._add("compute_seconds", seconds)

    def reconnected(self) -> None:
        self._add("reconnects", 1)

    def batch(self, header: pb.BatchHeader, decode_seconds: float) -> None:
        """One batch received (called by ``BatchClient.batches``)."""
        with self._lock:
            counts = self._counts
            counts["batches"] += 1
            counts["bytes"] += header.payload_size
            counts["decode_seconds"] += decode_seconds
            counts["server_wait_seconds"] += header.wait_seconds
            counts["build_seconds"] += header.build_seconds
        if _exported is not None:
            _exported.add(
                self._dataset,
                {
                    "batches": 1,
                    "bytes": header.payload_size,
                    "decode_seconds": decode_seconds,
                    "server_wait_seconds": header.wait_seconds,
                },
            )

    def end(self) -> StreamStats:
        """The pass is over: logs its line and returns its figures."""
        stats = self.stats()
        with self._lock:
            self._unreported = stats
        log.info("%s", stats.line())
        if _exported is not None:
            _exported.fraction(stats)
        return stats

    def take_report(self) -> pb.TrainerReport | None:
        """The last finished pass for the server (``trainer_report``), once."""
        with self._lock:
            stats, self._unreported = self._unreported, None
        if stats is None:
            return None
        return pb.TrainerReport(
            wait_seconds=stats.wait_seconds,
            compute_seconds=stats.compute_seconds,
            batches=stats.batches,
        )


class _Exported:
    """The trainer's Prometheus metrics, labelled by dataset name only."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        def counter(name: str, help: str) -> Any:
            return Counter(f"batchwire_client_{name}", help, ["dataset"], registry=registry)

        self._counters = {
            "wait_seconds": counter("data_wait_seconds", "Time the loop waited for a batch."),
            "compute_seconds": counter("compute_seconds", "Time the loop ran between batches."),
            "decode_seconds": counter("decode_seconds", "Time spent decoding batches."),
            "server_wait_seconds": counter(
                "server_worker_wait_seconds", "Server-reported time its stream waited on workers."
            ),
            "batches": counter("batches", "Batches received."),
            "bytes": counter("bytes", "Payload bytes received."),
            "reconnects": counter("reconnects", "Streams reopened after a break."),
        }
        self._fraction = Gauge(
            "batchwire_client_data_wait_fraction",
            "Share of step time spent waiting for data, last finished pass.",
            ["dataset"],
            registry=registry,
        )
        self._datasets: set[str] = set()

    def add(self, dataset: str, deltas: dict[str, float]) -> None:
        if dataset not in self._datasets:  # every series from the start, at 0
            self._datasets.add(dataset)
            for counter in self._counters.values():
                counter.labels(dataset)
        for key, value in deltas.items():
            counter = self._counters.get(key)
            if counter is not None and value:
                counter.labels(dataset).inc(value)

    def fraction(self, stats: StreamStats) -> None:
        self._fraction.labels(stats.dataset).set(stats.data_wait_fraction)


_exported: _Exported | None = None


def enable_metrics(registry: Any = None, port: int | None = None, host: str = "127.0.0.1") -> Any:
    """Exports the trainer's data-wait metrics to Prometheus (off until called).

    Args:
        registry: a ``prometheus_client`` registry; default: the global one.
        port: also serve them over HTTP on this port (0: a free one).
    Returns:
        The registry used.
    """
    global _exported
    import prometheus_client

    registry = registry or prometheus_client.REGISTRY
    if _exported is None:
        _exported = _Exported(registry)
    if port is not None:
        prometheus_client.start_http_server(port, addr=host, registry=registry)
    return registry
