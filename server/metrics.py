"""Prometheus metrics of one server, on their own registry (so tests can run several servers).

Exposed over HTTP when ``metrics_port`` is set. Names:

    batchwire_batches_sent_total{dataset}        batches fully sent
    batchwire_shared_batches_total{dataset}      batches a stream got from another stream's build
    batchwire_bytes_sent_total{dataset}          payload bytes sent
    batchwire_active_streams                     open StreamBatches calls
    batchwire_queue_depth{dataset}               built batches waiting to be sent, over a dataset's open streams
    batchwire_stream_worker_wait_seconds_total{dataset}  time streams waited for a worker to finish a batch
    batchwire_transport_bytes_sent_total{transport,compression}  payload bytes by transport (tcp, unix, shm, ...)
    batchwire_trainer_data_wait_seconds_total{dataset}  trainer-reported: training loops waited for data
    batchwire_trainer_compute_seconds_total{dataset}    trainer-reported: training loops computed
    batchwire_worker_busy_seconds_total          time worker processes spent building batches
    batchwire_batch_build_seconds{dataset}       histogram: time to load, transform and collate a batch
    batchwire_errors_total{code}                 calls ended with an error, by gRPC status code
    batchwire_workers_replaced_total             worker processes that died and were replaced
    batchwire_workers_alive                      worker processes alive now
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_BUILD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batches_sent = Counter(
            "batchwire_batches_sent", "Batches fully sent.", ["dataset"], registry=r
        )
        self.bytes_sent = Counter(
            "batchwire_bytes_sent", "Payload bytes sent.", ["dataset"], registry=r
        )
        self.shared_batches = Counter(
            "batchwire_shared_batches",
            "Batches a stream got from a build another stream asked for (shared builds).",
            ["dataset"],
            registry=r,
        )
        self.active_streams = Gauge(
            "batchwire_active_streams", "Open StreamBatches calls.", registry=r
        )
        # Labelled by dataset, never by stream: a label per stream id would add series
        # without bound on a long-running server (issue 16).
        self.queue_depth = Gauge(
            "batchwire_queue_depth",
            "Built batches waiting to be sent, summed over a dataset's open streams.",
            ["dataset"],
            registry=r,
        )
        self.worker_wait = Counter(
            "batchwire_stream_worker_wait_seconds",
            "Time streams waited for a worker to finish the batch they were to send next.",
            ["dataset"],
            registry=r,
        )
        self.transport_bytes = Counter(
            "batchwire_transport_bytes_sent",
            "Payload bytes sent, by transport (tcp, unix, shm, ...) and payload compression.",
            ["transport", "compression"],
            registry=r,
        )
        self.worker_busy = Counter(
            "batchwire_worker_busy_seconds",
            "Time worker processes spent building batches.",
            registry=r,
        )
        self.build_seconds = Histogram(
            "batchwire_batch_build_seconds",
            "Time to build one batch in a worker.",
            ["dataset"],
            buckets=_BUILD_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "batchwire_errors", "Calls ended with an error, by status code.", ["code"], registry=r
        )
        self.trainer_wait = Counter(
            "batchwire_trainer_data_wait_seconds",
            "Trainer-reported (previous pass): time training loops waited for the next batch.",
            ["dataset"],
            registry=r,
        )
        self.trainer_compute = Counter(
            "batchwire_trainer_compute_seconds",
            "Trainer-reported (previous pass): time training loops spent between batches.",
            ["dataset"],
            registry=r,
        )
        # dataset -> (data-wait fraction of the last report, reports); datasets are configured
        self.trainer_reports: dict[str, tuple[float, int]] = {}
        self._http = None
        self._streams_lock = threading.Lock()
        self.streams: dict[str, StreamMeter] = {}  # open ones; at most max_concurrent_streams

    def open_stream(
        self, stream_id: str, dataset: str, peer: str, compression: str, transport: str = ""
    ) -> StreamMeter:
        """Starts counting one stream; ``close()`` it when the stream ends.

        ``transport``: "shm" for a same-host stream; by default, the peer's (tcp, unix).
        """
        meter = StreamMeter(self, stream_id, dataset, transport or transport_of(peer), compression)
        with self._streams_lock:
            self.streams[stream_id] = meter
        self.active_streams.inc()
        return meter

    def trainer_reported(self, dataset: str, wait_seconds: float, compute_seconds: float) -> None:
        """A trainer's timing of its previous pass (``StreamBatchesRequest.trainer_report``)."""
        # Whatever a client sends: only finite, non-negative figures count.
        if not all(math.isfinite(v) and 0 <= v < 1e9 for v in (wait_seconds, compute_seconds)):
            return
        if wait_seconds + compute_seconds <= 0:
            return
        self.trainer_wait.labels(dataset).inc(wait_seconds)
        self.trainer_compute.labels(dataset).inc(compute_seconds)
        with self._streams_lock:
            _, reports = self.trainer_reports.get(dataset, (0.0, 0))
            fraction = wait_seconds / (wait_seconds + compute_seconds)
            self.trainer_reports[dataset] = (fraction, reports + 1)

    def trainer_report_items(self) -> list[tuple[str, tuple[float, int]]]:
        with self._streams_lock:
            return sorted(self.trainer_reports.items())

    def open_streams(self) -> list[StreamMeter]:
        with self._streams_lock:
            return list(self.streams.values())

    def _closed(self, meter: StreamMeter) -> None:
        with self._streams_lock:
            self.streams.pop(meter.stream_id, None)
        self.active_streams.dec()

    def track_pool(self, pool: PoolStats) -> None:
        """Reports the pool's own counts at each scrape (the pool does not know about metrics)."""
        self.registry.register(_PoolCollector(pool))

    def serve(self, host: str, port: int, pages: Pages | None = None) -> int:
        """Starts the HTTP endpoint (/metrics, and ``pages``' paths); returns its bound port."""
        from batchwire.server.dashboard import start_http

        self._http = start_http(host, port, self.registry, pages)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class PoolStats(Protocol):
    replaced: int

    @property
    def size(self) -> int: ...


class _PoolCollector:
    def __init__(self, pool: PoolStats) -> None:
        self._pool = pool

    def collect(self):
        yield CounterMetricFamily(
            "batchwire_workers_replaced",
            "Worker processes that died and were replaced.",
            value=self._pool.replaced,
        )
        yield GaugeMetricFamily(
            "batchwire_workers_alive", "Worker processes alive now.", value=self._pool.size
        )


class Pages(Protocol):
    def page(self, path: str) -> tuple[str, bytes] | None:
        """(content type, body) of ``path``, or None when it is not one of these pages."""


def transport_of(peer: str) -> str:
    """ "tcp", "unix" or "other" from a gRPC peer string ("ipv4:127.0.0.1:5000", "unix:...")."""
    kind = peer.split(":", 1)[0]
    if kind in ("ipv4", "ipv6"):
        return "tcp"
    return "unix" if kind == "unix" else "other"


@dataclass
class StreamMeter:
    """One open stream's counters; updates the server's metrics (by dataset) as it goes."""

    metrics: Metrics
    stream_id: str
    dataset: str
    transport: str
    compression: str
    started: float = field(default_factory=time.monotonic)
    batches: int = 0
    bytes: int = 0
    worker_wait_seconds: float = 0.0
    depth: int = 0

    def __post_init__(self) -> None:
        m = self.metrics
        # Labelled children looked up once per stream, not per batch.
        self._batches = m.batches_sent.labels(self.dataset)
        self._bytes = m.bytes_sent.labels(self.dataset)
        self._transport_bytes = m.transport_bytes.labels(self.transport, self.compression)
        self._build = m.build_seconds.labels(self.dataset)
        self._wait = m.worker_wait.labels(self.dataset)
        self._depth = m.queue_depth.labels(self.dataset)

    def sent(self, payload_bytes: int) -> None:
        self.batches += 1
        self.bytes += payload_bytes
        self._batches.inc()
        self._bytes.inc(payload_bytes)
        self._transport_bytes.inc(payload_bytes)

    def built(self, build_seconds: float) -> None:
        self._build.observe(build_seconds)
        self.metrics.worker_busy.inc(build_seconds)

    def waited(self, seconds: float) -> None:
        self.worker_wait_seconds += seconds
        self._wait.inc(seconds)

    def set_depth(self, depth: int) -> None:
        self._depth.inc(depth - self.depth)  # the dataset's gauge is the sum over its streams
        self.depth = depth

    def close(self) -> None:
        self.set_depth(0)
        self.metrics._closed(self)
