"""Where the server's time goes, over time: samples of its metrics, a log summary, dashboard data.

A thread reads the server's own Prometheus registry every ``sample_seconds``
and keeps the last few minutes of rates (batches and bytes per second, per
dataset, worker busy fraction, queue depth, build-time percentiles). Every
``summary_seconds`` it logs one line of them (``[server] summary_seconds``);
the dashboard page (``dashboard.py``) draws the same samples.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from batchwire.server.metrics import Metrics

log = logging.getLogger(__name__)

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]
HISTORY_SAMPLES = 300  # five minutes at one sample a second


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """Every sample of ``registry`` as {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def _total(snap: Snapshot, name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in snap.items()
        if n == name and all((k, w) in labels for k, w in match.items())
    )


def _by_label(snap: Snapshot, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in snap.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def _percentiles(buckets: dict[float, float], qs: tuple[float, ...]) -> list[float | None]:
    """Percentiles from cumulative histogram counts {upper bound: count}, linearly within a bucket."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return [None for _ in qs]
    out: list[float | None] = []
    for q in qs:
        rank, lower, below = q * total, 0.0, 0.0
        for bound in bounds:
            count = buckets[bound]
            if count >= rank:
                if math.isinf(bound):
                    out.append(lower)  # past the last finite bucket: its bound is all we know
                else:
                    share = (rank - below) / (count - below) if count > below else 1.0
                    out.append(lower + (bound - lower) * share)
                break
            lower, below = (bound if not math.isinf(bound) else lower), count
    return out


@dataclass
class Rates:
    """The server's activity between two snapshots."""

    seconds: float
    batches_per_s: float
    bytes_per_s: float
    datasets: dict[str, float]  # batches per second by dataset
    busy_fraction: float  # of the alive workers' time
    workers: int
    worker_wait_per_s: float  # stream-seconds per second spent waiting on workers
    queue_depth: float
    streams: int
    build_p50: float | None
    build_p90: float | None
    build_p99: float | None
    t: float = field(default_factory=time.time)

    def line(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.1f} ms"

        per_dataset = ", ".join(f"{k} {v:.1f}/s" for k, v in sorted(self.datasets.items()) if v)
        return (
            f"last {self.seconds:.0f} s: {self.batches_per_s:.1f} batches/s "
            f"({self.bytes_per_s / 1e6:.2f} MB/s){'; ' + per_dataset if per_dataset else ''}; "
            f"workers busy {self.busy_fraction:.0%} of {self.workers}; "
            f"streams waiting on workers {self.worker_wait_per_s:.2f} s/s; "
            f"queue depth {self.queue_depth:.0f}; build p50 {ms(self.build_p50)} "
            f"p99 {ms(self.build_p99)}; {self.streams} open stream(s)"
        )


def rates(before: Snapshot, after: Snapshot, seconds: float) -> Rates:
    dt = max(seconds, 1e-9)

    def delta(name: str) -> float:
        return _total(after, name) - _total(before, name)

    workers = int(_total(after, "batchwire_workers_alive"))
    datasets_after = _by_label(after, "batchwire_batches_sent_total", "dataset")
    datasets_before = _by_label(before, "batchwire_batches_sent_total", "dataset")
    buckets_after = _by_label(after, "batchwire_batch_build_seconds_bucket", "le")
    buckets_before = _by_label(before, "batchwire_batch_build_seconds_bucket", "le")
    buckets = {float(le): v - buckets_before.get(le, 0.0) for le, v in buckets_after.items()}
    p50, p90, p99 = _percentiles(buckets, (0.5, 0.9, 0.99))
    return Rates(
        seconds=seconds,
        batches_per_s=delta("batchwire_batches_sent_total") / dt,
        bytes_per_s=delta("batchwire_bytes_sent_total") / dt,
        datasets={k: (v - datasets_before.get(k, 0.0)) / dt for k, v in datasets_after.items()},
        busy_fraction=min(
            1.0, delta("batchwire_worker_busy_seconds_total") / (dt * max(workers, 1))
        ),
        workers=workers,
        worker_wait_per_s=delta("batchwire_stream_worker_wait_seconds_total") / dt,
        queue_depth=_total(after, "batchwire_queue_depth"),
        streams=int(_total(after, "batchwire_active_streams")),
        build_p50=p50,
        build_p90=p90,
        build_p99=p99,
    )


class Monitor:
    """Samples ``metrics`` in a thread; logs a summary every ``summary_seconds`` (0: never)."""

    def __init__(
        self, metrics: Metrics, *, summary_seconds: float, sample_seconds: float = 1.0
    ) -> None:
        self._metrics = metrics
        self._summary_seconds = summary_seconds
        self._sample_seconds = sample_seconds
        self._history: deque[Rates] = deque(maxlen=HISTORY_SAMPLES)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batchwire-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def history(self) -> list[Rates]:
        with self._lock:
            return list(self._history)

    def _run(self) -> None:
        clock = time.monotonic
        last = summary_from = snapshot(self._metrics.registry)
        last_at = summary_at = clock()
        while not self._stop.wait(self._sample_seconds):
            now, at = snapshot(self._metrics.registry), clock()
            with self._lock:
                self._history.append(rates(last, now, at - last_at))
            last, last_at = now, at
            if self._summary_seconds and at - summary_at >= self._summary_seconds:
                summary = rates(summary_from, now, at - summary_at)
                if summary.batches_per_s or summary.streams:  # an idle server says nothing
                    log.info("summary %s", summary.line())
                summary_from, summary_at = now, at

    def data(self) -> dict[str, Any]:
        """What the dashboard draws: recent samples, a 30 s window, the open streams."""
        history = self.history()
        recent = history[-30:]
        window = None
        if recent:
            seconds = sum(r.seconds for r in recent)
            window = {
                "batches_per_s": sum(r.batches_per_s * r.seconds for r in recent) / seconds,
                "bytes_per_s": sum(r.bytes_per_s * r.seconds for r in recent) / seconds,
                "busy_fraction": sum(r.busy_fraction * r.seconds for r in recent) / seconds,
            }
        now = time.monotonic()
        streams = [
            {
                "stream": m.stream_id,
                "dataset": m.dataset,
                "transport": m.transport,
                "compression": m.compression,
                "batches": m.batches,
                "bytes": m.bytes,
                "seconds": now - m.started,
                "batches_per_s": m.batches / max(now - m.started, 1e-9),
                "worker_wait_seconds": m.worker_wait_seconds,
                "queue_depth": m.depth,
            }
            for m in self._metrics.open_streams()
        ]
        trainers = {
            dataset: {"data_wait_fraction": fraction, "reports": reports}
            for dataset, (fraction, reports) in self._metrics.trainer_report_items()
        }
        return {
            "trainers": trainers,
            "samples": [asdict(r) for r in history],
            "window": window,
            "streams": streams,
        }
