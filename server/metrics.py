"""Prometheus metrics of one server, on their own registry (so tests can run several servers).

Exposed over HTTP when ``metrics_port`` is set. Names:

    batchwire_batches_sent_total{dataset}        batches fully sent
    batchwire_bytes_sent_total{dataset}          payload bytes sent
    batchwire_active_streams                     open StreamBatches calls
    batchwire_stream_queue_depth{stream}         built batches waiting to be sent, per open stream
    batchwire_worker_busy_seconds_total          time worker processes spent building batches
    batchwire_batch_build_seconds{dataset}       histogram: time to load, transform and collate a batch
    batchwire_errors_total{code}                 calls ended with an error, by gRPC status code
    batchwire_workers_replaced_total             worker processes that died and were replaced
    batchwire_workers_alive                      worker processes alive now
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
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
        self.active_streams = Gauge(
            "batchwire_active_streams", "Open StreamBatches calls.", registry=r
        )
        self.queue_depth = Gauge(
            "batchwire_stream_queue_depth",
            "Built batches waiting to be sent, per open stream.",
            ["stream"],
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
        self._http = None

    def track_pool(self, pool: PoolStats) -> None:
        """Reports the pool's own counts at each scrape (the pool does not know about metrics)."""
        self.registry.register(_PoolCollector(pool))

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint; returns its bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
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
