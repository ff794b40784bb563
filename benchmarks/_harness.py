"""Shared pieces of the benchmark scripts: a real server, the baselines, the measurements.

Every script starts its own ``batchwire serve`` process on a free loopback
port, measures batchwire with the load-test code of ``batchwire bench``
(clients in their own processes), runs its baselines in the same run, and
prints a table and writes JSON. CPU time is read from /proc for the server's
process tree and from ``getrusage`` for the (finished) client processes, so a
result also says where the cycles went.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _shapes import SHAPES  # noqa: F401 (the scripts take them from here)

from batchwire.server.launch import ServeProcess

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def arguments(description: str, **defaults: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes; runs end after a few batches (smoke)"
    )
    parser.add_argument("--duration", type=float, default=defaults.get("duration", 8.0))
    parser.add_argument("--warmup", type=float, default=defaults.get("warmup", 2.0))
    parser.add_argument("--repeats", type=int, default=defaults.get("repeats", 1))
    parser.add_argument("--json", help="where to write results (default benchmarks/results/)")
    return parser


# Smoke runs (--quick) end after this many batches per client (messages of a bare
# stream), never after some seconds: a busy machine may deliver nothing in a second.
QUICK_BATCHES = 8


def timing(args: argparse.Namespace) -> tuple[float, float, int]:
    """(duration, warmup, repeats), shrunk under ``--quick`` (see ``stop_after``)."""
    if args.quick:
        return min(args.duration, 0.5), min(args.warmup, 0.2), 1
    return args.duration, args.warmup, args.repeats


def stop_after(args: argparse.Namespace) -> int | None:
    """Batches per client a run measures under ``--quick`` (None: it measures ``duration``)."""
    return QUICK_BATCHES if args.quick else None


# -- configs ----------------------------------------------------------------------


def dataset_toml(
    name: str,
    shape: list[int],
    dtype: str,
    *,
    source: str,
    length: int,
    pattern: str = "noise",
    distinct: int = 16,
) -> str:
    """A dataset of ``{"image": shape/dtype, "label": int64}`` items.

    ``source="python"``: ``_datasets:repeating``, whose workers do no work beyond
    collating (the equivalent of the tf.data-service figures); ``"synthetic"``:
    the built-in source, which draws every sample from a seeded RNG.
    """
    if source == "python":
        return (
            f'[datasets.{name}]\nsource = "python"\nfactory = "_datasets:repeating"\n'
            f'kwargs = {{ length = {length}, shape = {shape}, dtype = "{dtype}", '
            f'pattern = "{pattern}", distinct = {distinct} }}\n'
        )
    return (
        f'[datasets.{name}]\nsource = "synthetic"\nlength = {length}\n'
        f'fields.image = {{ shape = {shape}, dtype = "{dtype}" }}\n'
        'fields.label = { shape = [], dtype = "int64", high = 10 }\n'
    )


def server_toml(datasets: Sequence[str], **settings: Any) -> str:
    lines = ["[server]", f'python_path = ["{HERE}"]', "max_batch_size = 4096"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(datasets)


# -- the server -------------------------------------------------------------------


class Server(ServeProcess):
    """``batchwire serve`` of ``config_text`` in its own process; ``target`` once started."""

    def __init__(
        self, config_text: str, *, workers: int = 2, env: dict[str, str] | None = None
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="batchwire-bench-"))
        config = self.folder / "bench.toml"
        config.write_text(config_text)
        super().__init__(config, workers=workers, log_level="WARNING", env=env)

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def tree(self) -> list[int]:
        """The server's pid and its descendants' (forkserver, workers)."""
        assert self.process is not None
        return process_tree(self.process.pid)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far: the gRPC process, and everything below it (the workers)."""
        assert self.process is not None
        pids = self.tree()
        grpc_process = _cpu(self.process.pid)
        return {"server": grpc_process, "workers": sum(_cpu(p) for p in pids[1:])}

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory: the gRPC process, and the whole tree."""
        assert self.process is not None
        pids = self.tree()
        by_pid = {pid: _rss(pid) for pid in pids}
        return {"server": by_pid[self.process.pid], "tree": sum(by_pid.values()), "by_pid": by_pid}


def process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return 0


# -- measurements -----------------------------------------------------------------


def bench(server: Server, dataset: str, batch_size: int, **options: Any) -> dict[str, Any]:
    """One ``batchwire bench`` run; adds the CPU seconds each side spent per GB."""
    from batchwire.client import bench as load_test

    config = load_test.BenchConfig(server.target, dataset, batch_size, **options)
    server_before = server.cpu_seconds()
    report = load_test.run(config, progress=None)
    server_after = server.cpu_seconds()
    gigabytes = max(report["bytes"], 1) / 1e9
    # CPU over the whole run (warm-up included) per GB measured: a profile by process.
    spent = {
        "server": server_after["server"] - server_before["server"],
        "workers": server_after["workers"] - server_before["workers"],
        "clients": sum(c["cpu_seconds"] for c in report["clients"]),  # from start to end
    }
    span = config.warmup + config.duration
    report["cpu_seconds_per_gb"] = {
        key: value / gigabytes * config.duration / span for key, value in spent.items()
    }
    if report["errors"]:
        raise RuntimeError(f"bench of {dataset} failed: {report['errors'][:3]}")
    return report


def best(runs: list[dict[str, Any]], key: str = "mb_per_s") -> dict[str, Any]:
    """The run with the median ``key`` (the machine is shared: repeats and a median)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[len(ordered) // 2]


def iperf3(seconds: float) -> float | None:
    """Loopback TCP bytes/s by iperf3 (Debian's), or None when it is not installed."""
    if shutil.which("iperf3") is None:
        return None
    port = free_port()
    server = subprocess.Popen(
        ["iperf3", "-s", "-1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(max(1, round(seconds))), "-J"],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 8
    finally:
        server.kill()
        server.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A bare grpcio stream of pre-built bytes: the ceiling of grpcio itself.
_BARE_SERVICE = "bare.Bytes"


def _bare_server(port_queue: Any, chunk_bytes: int, options: list[tuple[str, Any]]) -> None:
    from concurrent import futures

    import grpc

    payload = os.urandom(chunk_bytes)

    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(int.from_bytes(request, "little")):
            yield payload

    handler = grpc.method_handlers_generic_handler(
        _BARE_SERVICE, {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4), options=options)
    server.add_generic_rpc_handlers((handler,))
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def bare_grpc(
    chunk_bytes: int, seconds: float, *, tuned: bool, messages: int | None = None
) -> float:
    """Bytes/s of one grpcio stream of ``chunk_bytes`` messages (server in another process).

    ``tuned``: batchwire's channel options on both sides; else grpcio's defaults
    (message size limits lifted only). ``messages``: stop after that many instead
    of after ``seconds``.
    """
    return bare_grpc_run(chunk_bytes, seconds, tuned=tuned, messages=messages)["bytes_per_s"]


def bare_grpc_run(
    chunk_bytes: int, seconds: float, *, tuned: bool, messages: int | None = None
) -> dict[str, float]:
    """``bare_grpc``'s run, with its message count and each side's CPU seconds.

    Server CPU from /proc; client CPU from ``getrusage`` of this process (which
    only receives while it measures).
    """
    import resource

    import grpc

    from batchwire.client._channel import _OPTIONS

    def client_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    # Message limits lifted first: with a key given twice, grpcio takes the first.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    options += [o for o in _OPTIONS if not o[0].endswith("message_length")] if tuned else []
    ctx = mp.get_context("spawn")
    port_queue = ctx.Queue()
    process = ctx.Process(target=_bare_server, args=(port_queue, chunk_bytes, options), daemon=True)
    process.start()
    try:
        port = port_queue.get(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_stream(f"/{_BARE_SERVICE}/Stream")
            for _ in call((8).to_bytes(8, "little")):  # connect and warm up
                pass
            server_before, client_before = _cpu(process.pid), client_cpu()
            received, started = 0, time.perf_counter()
            stream = call((1 << 40).to_bytes(8, "little"))
            for _ in stream:
                received += 1
                if received == messages or (
                    messages is None and time.perf_counter() - started >= seconds
                ):
                    break
            elapsed = time.perf_counter() - started
            stream.cancel()
            server_seconds = _cpu(process.pid) - server_before
            client_seconds = client_cpu() - client_before
    finally:
        process.kill()
        process.join()
    return {
        "messages": received,
        "bytes_per_s": received * chunk_bytes / elapsed,
        "seconds": elapsed,
        "server_cpu_seconds": server_seconds,
        "client_cpu_seconds": client_seconds,
    }


# -- output -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import grpc
    import torch

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def write_json(name: str, args: argparse.Namespace, data: dict[str, Any]) -> Path:
    path = (
        Path(args.json) if args.json else RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), "quick": args.quick, **data}
    path.write_text(json.dumps(data, indent=2))
    print(f"\nwrote {path}")
    return path


NETNS_ENV = "BATCHWIRE_BENCH_NETNS"
"""Set in a benchmark run again inside a loopback-only network namespace."""


def in_loopback_netns() -> bool:
    return bool(os.environ.get(NETNS_ENV))


def rerun_in_loopback_netns(script: str, env: dict[str, str] | None = None) -> None:
    """Runs ``script`` (with this process's arguments) again in a network namespace whose
    only interface is ``lo`` (``unshare -n``, as root), and exits with its status: tools
    that pick their own address (Ray, tf.data service) then reach nothing but loopback."""
    import sys

    env = {**os.environ, **(env or {}), NETNS_ENV: "1"}
    command = " ".join([sys.executable, str(Path(script).resolve()), *sys.argv[1:]])
    done = subprocess.run(
        ["unshare", "-n", "--", "sh", "-c", f"ip link set lo up && exec {command}"], env=env
    )
    sys.exit(done.returncode)
