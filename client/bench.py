"""``batchwire bench``: the load test.

N client processes (spawned, so each has its own GIL and gRPC channel) each
open k streams of one dataset, start together, and stream for a warm-up and
then a measured window: ``duration`` seconds, or (``batches``) until each
client has received that many batches, which a busy machine cannot leave
empty. Every batch's arrival time and size is recorded in the
client; the parent prints a live progress line from shared counters and, at
the end, a report in the spirit of ghz: throughput, time to first batch,
latency between batches (percentiles and a histogram), and per-client rates
with the fairness ratio slowest/fastest. ``--json`` writes all of it.

Stream ``j`` of a client's k asks for batches ``j, j + k, j + 2k, ...`` of each
epoch (``start_batch``/``batch_stride``), so the k streams share one epoch
without overlap, as parallel streams of one trainer would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing as mp
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import grpc

from batchwire import wire
from batchwire.client._channel import BatchClient, wait_for_server
from batchwire.client._errors import BatchwireError, ConnectError, ServerError
from batchwire.client._shm import TRANSPORTS, PayloadMapper
from batchwire.client._targets import grpc_target
from batchwire.compression import NAMES as compression_names
from batchwire.compression import codec
from batchwire.v1 import batchwire_pb2 as pb

JSON_SCHEMA_VERSION = 1
TIMELINE_BINS = 50
"""The measured window in this many bins: each client's throughput over time (``--plot``)."""
_START_DELAY = 0.3  # seconds between "all clients ready" and the common start
_READY_TIMEOUT = 120.0  # seconds a spawned client may take to import torch and connect
_BATCHES_TIMEOUT = 600.0  # seconds a run by batch count may take before it counts as hung


class BenchError(BatchwireError):
    """The load test could not run (server unreachable, bad dataset, a client failed)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to load-test; times in seconds."""

    target: str
    dataset: str
    batch_size: int
    clients: int = 1
    duration: float = 10.0
    warmup: float = 2.0
    streams: int = 1
    compression: str = "none"
    shuffle: bool = False
    batches: int | None = None
    """Measure until each client has this many batches after the warm-up, instead of
    for ``duration`` seconds (a run that ends by count, as smoke runs must)."""
    transport: str = "grpc"
    """"grpc": bytes over gRPC, what a remote trainer gets; "shm": batches mapped from
    the server's shared memory (same host; an error when it cannot be used); "auto":
    shared memory where proven usable (as ``RemoteDataset``), else gRPC."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "clients", "streams", "batches"):
            value = getattr(self, name)
            if name == "batches" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} should be a positive integer, but got {name}={value!r}")
        if not self.duration > 0:
            raise ValueError(f"duration should be positive seconds, but got {self.duration!r}")
        if not self.warmup >= 0:
            raise ValueError(f"warmup should be >= 0 seconds, but got {self.warmup!r}")
        if self.compression not in compression_names:
            raise ValueError(
                f"compression should be one of {', '.join(compression_names)}, got {self.compression!r}"
            )
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"transport should be one of {', '.join(TRANSPORTS)}, got {self.transport!r}"
            )
        grpc_target(self.target)


# -- one client process ---------------------------------------------------------


@dataclass
class _StreamLog:
    """What one stream saw: arrival times (monotonic seconds) and sizes of its batches."""

    opened: float = 0.0
    first: float | None = None
    times: array | None = None
    raw_bytes: array | None = None
    wire_bytes: array | None = None
    error: str | None = None


class _Quota:
    """Ends a client's streams: at ``end_at``, or once its streams together have
    ``batches`` batches that arrived at or after ``measure_from``."""

    def __init__(self, end_at: float, measure_from: float, batches: int | None) -> None:
        self.end_at = end_at
        self.measure_from = measure_from
        self.batches = batches
        self._measured = 0
        self._lock = threading.Lock()
        self._done = False

    def arrived(self, now: float) -> bool:
        """Counts a batch that arrived at ``now``; True when the stream should stop."""
        if self.batches is None:
            return now >= self.end_at
        with self._lock:
            if now >= self.measure_from:
                self._measured += 1
            self._done = self._done or self._measured >= self.batches
            return self._done


def _request(config: BenchConfig, epoch: int, stream: int) -> pb.StreamBatchesRequest:
    return pb.StreamBatchesRequest(
        dataset=config.dataset,
        batch_size=config.batch_size,
        shuffle=config.shuffle,
        epoch=epoch,
        world_size=1,
        start_batch=stream,
        batch_stride=config.streams,
        compression=codec(config.compression),
    )


def _run_stream(
    config: BenchConfig,
    stream: int,
    quota: _Quota,
    counters: Any,
    slot: int,
    log: _StreamLog,
    nonce: bytes = b"",
) -> None:
    """``nonce``: the client's shared-memory proof (``_shm``); empty: bytes over gRPC."""
    from batchwire import compression

    client = BatchClient(config.target)
    log.times, log.raw_bytes, log.wire_bytes = array("d"), array("q"), array("q")
    log.opened = time.monotonic()
    epoch = 0
    try:
        while True:
            request = _request(config, epoch, stream)
            request.shared_memory_nonce = nonce
            call = client.stream(request)
            # Mapped batches are dropped at once, as a fast trainer would: released to the server.
            mapper = PayloadMapper(config.target) if nonce else None
            assembler = wire.BatchAssembler(compression.decompress, mapper)
            try:
                for chunk in call:
                    for header, _ in assembler.feed(chunk):
                        now = time.monotonic()
                        if log.first is None:
                            log.first = now
                        log.times.append(now)
                        log.raw_bytes.append(header.raw_size)
                        log.wire_bytes.append(header.payload_size)
                        counters[slot] += 1
                        counters[slot + 1] += header.raw_size
                        if quota.arrived(now):
                            return
            finally:
                call.cancel()
                if mapper is not None:
                    mapper.close()
            epoch += 1
    except grpc.RpcError as exc:
        log.error = f"stream {stream}: {ServerError.from_rpc(exc, config.target)}"
    except Exception as exc:
        log.error = f"stream {stream}: {type(exc).__name__}: {exc}"


def _client_main(
    config: BenchConfig, index: int, counters: Any, start_at: Any, go: Any, results: Any
) -> None:
    """Body of one spawned client process; reports ("ready", i) then ("done", i, record)."""
    import torch  # noqa: F401  (imported before the start, not inside the measured window)

    from batchwire import compression  # noqa: F401  (likewise)

    # Connect before the start: time to first batch is then request -> first batch,
    # not TCP and HTTP/2 set-up (which `ready` would otherwise include).
    with contextlib.suppress(ConnectError):  # the streams will report it
        wait_for_server(config.target)
    # Each client process proves for itself that it can map the server's memory.
    decision = BatchClient(config.target).transport(config.transport)
    results.put(("ready", index))
    if not go.wait(_READY_TIMEOUT):
        return
    start = start_at.value
    quota = _Quota(start + config.warmup + config.duration, start + config.warmup, config.batches)
    while time.monotonic() < start:
        time.sleep(0.001)
    logs = [_StreamLog() for _ in range(config.streams)]
    cpu_start = time.process_time()
    threads = [
        threading.Thread(
            target=_run_stream,
            args=(config, j, quota, counters, 2 * index, logs[j], decision.nonce),
            name=f"bench-client{index}-stream{j}",
            daemon=True,
        )
        for j in range(config.streams)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = {
        "transport": decision.transport,
        "cpu_seconds": time.process_time() - cpu_start,
        "streams": [
            {
                "opened": log.opened,
                "first": log.first,
                "times": list(log.times or ()),
                "raw_bytes": list(log.raw_bytes or ()),
                "wire_bytes": list(log.wire_bytes or ()),
                "error": log.error,
            }
            for log in logs
        ],
    }
    results.put(("done", index, record))


# -- the parent -------------------------------------------------------------------


def _preflight(config: BenchConfig) -> tuple[pb.DatasetInfo, int]:
    """Checks the server and dataset before spawning anything; returns info and batch bytes.

    An unreachable server raises ``ConnectError`` (from ``BatchClient``), as it does
    for every client command.
    """
    client = BatchClient(config.target, timeout=30.0)
    try:
        client.transport(config.transport)  # "shm" that cannot be: TransportError, named
        info = client.describe(config.dataset)
        call = client.stream(_request(config, 0, 0))
        try:
            for chunk in call:
                if chunk.header is not None:
                    return info, chunk.header.raw_size
        finally:
            call.cancel()
    except grpc.RpcError as error:
        raise BenchError(str(ServerError.from_rpc(error, config.target))) from None
    except ServerError as exc:
        raise BenchError(str(exc)) from None
    raise BenchError(f"dataset {config.dataset!r} at {config.target} has no batches to stream")


class _Progress:
    """The live line: elapsed, phase, batches and rates from the clients' shared counters."""

    def __init__(self, config: BenchConfig, counters: Any, out: TextIO) -> None:
        self.config = config
        self.counters = counters
        self.out = out
        self.tty = out.isatty()
        self.last = (time.monotonic(), 0.0, 0.0)
        self.printed = 0.0

    def update(self, start: float, *, final: bool = False) -> None:
        now = time.monotonic()
        batches = sum(self.counters[0::2])
        nbytes = sum(self.counters[1::2])
        then, then_batches, then_bytes = self.last
        dt = max(now - then, 1e-9)
        rate, bandwidth = (batches - then_batches) / dt, (nbytes - then_bytes) / dt
        self.last = (now, batches, nbytes)
        elapsed = now - start
        phase = "warm-up" if elapsed < self.config.warmup else "measuring"
        total = self.config.warmup + self.config.duration
        clock = (
            f"{elapsed:6.1f}s"
            if self.config.batches  # it ends by count: no known total
            else f"{min(elapsed, total):6.1f}s/{total:.1f}s"
        )
        line = (
            f"[{clock}] {phase:<9} {int(batches):>9} batches  "
            f"{rate:10.1f} batches/s  {bandwidth / 1e6:9.1f} MB/s"
        )
        if self.tty:
            self.out.write("\r" + line)
            self.out.flush()
        elif final or now - self.printed >= 2.0:  # a log, not a terminal: a line every 2 s
            self.out.write(line + "\n")
            self.out.flush()
            self.printed = now

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def run(config: BenchConfig, *, progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Runs the load test; returns the report (see ``format_report``). Raises ``BenchError``."""
    info, batch_bytes = _preflight(config)
    ctx = mp.get_context("spawn")  # never fork a process that holds gRPC threads
    counters = ctx.Array("d", 2 * config.clients, lock=False)
    start_at = ctx.Value("d", 0.0, lock=False)
    go = ctx.Event()
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=_client_main,
            args=(config, i, counters, start_at, go, results),
            name=f"batchwire-bench-client-{i}",
            daemon=True,
        )
        for i in range(config.clients)
    ]
    for process in processes:
        process.start()
    records: dict[int, dict[str, Any]] = {}
    try:
        _await_ready(results, processes)
        start = time.monotonic() + _START_DELAY
        start_at.value = start
        go.set()
        meter = _Progress(config, counters, progress) if progress is not None else None
        deadline = start + config.warmup + config.duration + max(30.0, config.duration)
        if config.batches:
            deadline = start + config.warmup + _BATCHES_TIMEOUT
        while len(records) < config.clients:
            if meter is not None and time.monotonic() >= start:
                meter.update(start)
            _collect(results, records, timeout=0.5)
            if time.monotonic() > deadline:
                raise BenchError(f"clients did not finish; {len(records)} of {config.clients} did")
            dead = [
                p.name for i, p in enumerate(processes) if i not in records and not p.is_alive()
            ]
            if dead and not _collect(results, records, timeout=1.0):
                raise BenchError(f"client process(es) died: {', '.join(dead)}")
        if meter is not None:
            meter.update(start, final=True)
            meter.close()
    finally:
        for process in processes:
            process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
    return summarize(config, info, batch_bytes, start, [records[i] for i in range(config.clients)])


def _await_ready(results: Any, processes: list[Any]) -> None:
    ready = 0
    deadline = time.monotonic() + _READY_TIMEOUT
    while ready < len(processes):
        try:
            message = results.get(timeout=0.5)
        except Exception:
            if any(not p.is_alive() for p in processes):
                raise BenchError("a client process died while starting") from None
            if time.monotonic() > deadline:
                raise BenchError("client processes did not start in time") from None
            continue
        if message[0] == "ready":
            ready += 1


def _collect(results: Any, records: dict[int, dict[str, Any]], timeout: float) -> bool:
    try:
        message = results.get(timeout=timeout)
    except Exception:
        return False
    if message[0] == "done":
        records[message[1]] = message[2]
    return True


# -- statistics -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; ``sorted_values`` is sorted."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def histogram(sorted_values: Sequence[float], buckets: int = 10) -> list[dict[str, float]]:
    """Log-spaced buckets from min to max: ``[{"le": upper_bound, "count": n}, ...]``."""
    if not sorted_values:
        return []
    low, high = max(sorted_values[0], 1e-7), max(sorted_values[-1], 1e-7)
    if high <= low * 1.0001:
        return [{"le": high, "count": len(sorted_values)}]
    ratio = (high / low) ** (1 / buckets)
    bounds = [low * ratio ** (i + 1) for i in range(buckets)]
    bounds[-1] = high
    counts = [0] * buckets
    i = 0
    for value in sorted_values:
        while i < buckets - 1 and value > bounds[i]:
            i += 1
        counts[i] += 1
    return [{"le": bound, "count": count} for bound, count in zip(bounds, counts, strict=True)]


def summarize(
    config: BenchConfig,
    info: pb.DatasetInfo,
    batch_bytes: int,
    start: float,
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    """Turns the clients' arrival logs into the report.

    The measured window starts after the warm-up and lasts ``duration`` seconds,
    or (``batches``) for each client until its ``batches``-th batch; rates are per
    second of that window ("seconds" in the report: the longest client's window).
    """
    opens = start + config.warmup
    errors = [s["error"] for r in records for s in r["streams"] if s["error"]]
    first_batch = [
        s["first"] - s["opened"] for r in records for s in r["streams"] if s["first"] is not None
    ]
    gaps: list[float] = []
    clients = []
    spans: list[float] = []
    measured_arrivals: list[list[float]] = []  # per client, for the timeline
    totals = {"batches": 0, "raw_bytes": 0, "wire_bytes": 0}
    for index, record in enumerate(records):
        arrivals: list[tuple[float, int, int]] = []
        for stream in record["streams"]:
            arrivals += zip(stream["times"], stream["raw_bytes"], stream["wire_bytes"], strict=True)
        arrivals.sort()
        if config.batches:
            inside = [a for a in arrivals if a[0] >= opens][: config.batches]
            closes = inside[-1][0] if inside else opens
            span = max(closes - opens, 1e-9)
        else:
            closes, span = opens + config.duration, config.duration
            inside = [a for a in arrivals if opens <= a[0] < closes]
        spans.append(span)
        # A trainer sees the batches of all its streams: gaps are between consecutive
        # arrivals at the client, counted when the later one falls in the window.
        measured = set(inside)
        for before, after in itertools.pairwise(arrivals):
            if after in measured:
                gaps.append(after[0] - before[0])
        measured_arrivals.append([a[0] for a in inside])
        batches = len(inside)
        raw = sum(a[1] for a in inside)
        wire_bytes = sum(a[2] for a in inside)
        totals["batches"] += batches
        totals["raw_bytes"] += raw
        totals["wire_bytes"] += wire_bytes
        firsts = [s["first"] - s["opened"] for s in record["streams"] if s["first"] is not None]
        clients.append(
            {
                "client": index,
                "batches": batches,
                "batches_per_s": batches / span,
                "mb_per_s": raw / span / 1e6,
                "time_to_first_batch_s": min(firsts) if firsts else None,
                "cpu_seconds": record["cpu_seconds"],
                "errors": [s["error"] for s in record["streams"] if s["error"]],
            }
        )
    seconds = max(spans, default=config.duration)
    bins = TIMELINE_BINS
    bin_s = max(seconds, 1e-9) / bins
    timeline: list[list[float]] = []  # per client: batches/s in each bin of the window
    for times in measured_arrivals:
        counts = [0] * bins
        for arrival in times:
            counts[min(int((arrival - opens) / bin_s), bins - 1)] += 1
        timeline.append([count / bin_s for count in counts])
    gaps.sort()
    first_batch.sort()
    rates = [c["batches_per_s"] for c in clients]
    fairness = (min(rates) / max(rates)) if rates and max(rates) > 0 else 0.0
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "config": asdict(config),
        "dataset": {
            "name": info.name,
            "source": info.source,
            "length": info.length,
            "batch_bytes": batch_bytes,
        },
        "transport": ",".join(sorted({r.get("transport", "grpc") for r in records})),
        "seconds": seconds,
        "batches": totals["batches"],
        "samples_per_s": totals["batches"] * config.batch_size / seconds,
        "batches_per_s": totals["batches"] / seconds,
        "bytes": totals["raw_bytes"],
        "wire_bytes": totals["wire_bytes"],
        "mb_per_s": totals["raw_bytes"] / seconds / 1e6,
        "wire_mb_per_s": totals["wire_bytes"] / seconds / 1e6,
        "time_to_first_batch_s": _stats(first_batch),
        "latency_s": _stats(gaps),
        "latency_histogram": histogram(gaps),
        "timeline": {"bin_s": bin_s, "batches_per_s": timeline},
        "clients": clients,
        "fairness": fairness,
        "errors": errors,
    }


def _stats(sorted_values: list[float]) -> dict[str, float | int | None]:
    if not sorted_values:
        return {
            "count": 0,
            "min": None,
            "mean": None,
            "p50": None,
            "p90": None,
            "p99": None,
            "max": None,
        }
    return {
        "count": len(sorted_values),
        "min": sorted_values[0],
        "mean": sum(sorted_values) / len(sorted_values),
        "p50": percentile(sorted_values, 50),
        "p90": percentile(sorted_values, 90),
        "p99": percentile(sorted_values, 99),
        "max": sorted_values[-1],
    }


# -- the report -------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


_TRANSPORT_NAMES = {"grpc": "gRPC (bytes)", "shm": "shared memory (mapped batches)"}


def format_report(report: dict[str, Any]) -> str:
    """The human report (ghz-like): summary, latency, histogram, per-client table."""
    config, dataset = report["config"], report["dataset"]
    lines = [
        "Summary:",
        f"  Target:       {config['target']}",
        f"  Dataset:      {dataset['name']} ({dataset['source']}, {dataset['length']} samples)",
        f"  Batch:        {config['batch_size']} samples, {dataset['batch_bytes'] / 1e6:.3f} MB",
        f"  Clients:      {config['clients']} x {config['streams']} stream(s)"
        + (f", {config['compression']}" if config["compression"] != "none" else ""),
        f"  Transport:    {_TRANSPORT_NAMES.get(report['transport'], report['transport'])}",
        f"  Duration:     {report['seconds']:.3g} s measured"
        + (f" ({config['batches']} batches per client)" if config.get("batches") else "")
        + f" after {config['warmup']:g} s warm-up",
        f"  Batches:      {report['batches']}",
        f"  Batches/s:    {report['batches_per_s']:.1f}",
        f"  Samples/s:    {report['samples_per_s']:.1f}",
        f"  Throughput:   {report['mb_per_s']:.1f} MB/s"
        + (
            f" (wire {report['wire_mb_per_s']:.1f} MB/s)"
            if report["wire_bytes"] != report["bytes"]
            else ""
        ),
        "",
    ]
    first = report["time_to_first_batch_s"]
    lines += [
        "Time to first batch:",
        f"  min {_ms(first['min'])}  mean {_ms(first['mean'])}  max {_ms(first['max'])}",
        "",
    ]
    latency = report["latency_s"]
    lines.append("Latency between batches (per client):")
    for key in ("p50", "p90", "p99", "max"):
        lines.append(f"  {key:<4} {_ms(latency[key])}")
    lines.append("")
    buckets = report["latency_histogram"]
    if buckets:
        lines.append("Latency histogram:")
        peak = max(b["count"] for b in buckets) or 1
        for bucket in buckets:
            bar = "#" * math.ceil(40 * bucket["count"] / peak) if bucket["count"] else ""
            lines.append(f"  <= {bucket['le'] * 1e3:10.3f} ms [{bucket['count']:>7}] |{bar}")
        lines.append("")
    lines.append("Per client:")
    lines.append(
        f"  {'client':>6} {'batches':>9} {'batches/s':>10} {'MB/s':>9} {'first batch':>12}"
    )
    for c in report["clients"]:
        lines.append(
            f"  {c['client']:>6} {c['batches']:>9} {c['batches_per_s']:>10.1f} "
            f"{c['mb_per_s']:>9.1f} {_ms(c['time_to_first_batch_s']):>12}"
        )
    lines.append(f"  Fairness (slowest/fastest): {report['fairness']:.3f}")
    if report["errors"]:
        lines += ["", "Errors:", *(f"  {e}" for e in report["errors"])]
    return "\n".join(lines)


def main(
    config: BenchConfig,
    *,
    json_path: str | None = None,
    plot_path: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """The CLI's body: run, print, write JSON and a plot; 0 when every batch arrived without error."""
    if plot_path:
        from batchwire.client import bench_plot

        bench_plot.check()  # before the run: a missing matplotlib should not cost a benchmark
    report = run(config)
    print(format_report(report), file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    if plot_path:
        bench_plot.plot(report, plot_path)
        print(f"plot: {plot_path}", file=out)
    if report["errors"]:
        print(f"batchwire bench: {len(report['errors'])} stream(s) failed", file=sys.stderr)
        return 1
    if report["batches"] == 0:
        print("batchwire bench: no batch arrived in the measured window", file=sys.stderr)
        return 1
    return 0
