"""The ``batchwire`` command: serve, ls, inspect, bench, health.

The one module that knows both sides: each subcommand imports the server or
the client inside its own function, so ``batchwire ls`` never loads server code.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace

DEFAULT_TARGET = "localhost:50051"
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _target(args: argparse.Namespace) -> str:
    """The gRPC target: one host:port, replicas comma-separated, or a gRPC name (dns:///...)."""
    from batchwire.client._targets import grpc_target

    return grpc_target(args.target or os.environ.get("BATCHWIRE_TARGET") or DEFAULT_TARGET)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("batchwire")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _number(kind: type, low: float, *, above: bool = False):
    """An argparse type: ``kind`` values >= ``low`` (> ``low`` if ``above``), saying what it got."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low or (above and value == low):
            what = {int: "an integer", float: "a number"}[kind]
            bound = f"> {low}" if above else f">= {low}"
            raise argparse.ArgumentTypeError(f"should be {what} {bound}, but got {text!r}")
        return value

    return parse


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from batchwire.server import BatchwireServer, ConfigError, load_config

    try:
        config = load_config(args.config)
        if args.metrics_port is not None:
            config = replace(config, server=replace(config.server, metrics_port=args.metrics_port))
        _configure_logging(args.log_level or config.server.log_level)
        server = BatchwireServer(config, host=args.host, port=args.port, workers=args.workers)
    except (ConfigError, ValueError) as exc:
        print(f"batchwire serve: bad config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:  # BatchwireServer says "port N is in use"
            print(f"batchwire serve: {exc.strerror} (pick another, or --port 0)", file=sys.stderr)
        else:
            print(f"batchwire serve: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server.start()
    except OSError as exc:  # e.g. the metrics port is taken
        print(f"batchwire serve: cannot start: {exc}", file=sys.stderr)
        server.stop(grace=0)
        return 1
    names = ", ".join(server.registry.names())
    # Tests and scripts read the bound port from this line (with --port 0).
    print(
        f"batchwire: serving {names} on {server.host}:{server.port} with {server.pool.size} workers"
        + (f", metrics on port {server.metrics_port}" if server.metrics_port is not None else ""),
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    logging.getLogger("batchwire").info("shutting down")
    server.stop(grace=args.grace)  # None: the config's grace_seconds
    print("batchwire: stopped", flush=True)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from batchwire import wire
    from batchwire.client import BatchClient

    rows = [["DATASET", "SOURCE", "SAMPLES", "FIELDS"]]
    for info in BatchClient(_target(args)).list_datasets():
        fields = ", ".join(
            f"{f.name}: {wire.dtype_name(f.dtype)}{list(f.shape)}" for f in info.fields
        )
        rows.append([info.name, info.source, str(info.length), fields])
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[3]]))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from batchwire import wire
    from batchwire.client import BatchClient, RemoteDataset

    info = BatchClient(_target(args)).describe(args.dataset)
    print(f"dataset: {info.name}\nsource:  {info.source}\nlength:  {info.length}\nfields:")
    for field in info.fields:
        print(f"  {field.name}: {wire.dtype_name(field.dtype)} {list(field.shape)}")
    print(f"sampler: {info.sampler.kind or 'distributed'}\ntransforms:")
    for line in info.transforms or ["(none)"]:
        print(f"  {line}")
    dataset = RemoteDataset(_target(args), args.dataset, batch_size=args.batch_size)
    batch = next(iter(dataset), None)
    if batch is None:
        return 0
    print(f"first batch of {args.batch_size}:")
    tensors, structure = wire.flatten(batch)
    for field, tensor in zip(wire.field_infos(structure, tensors), tensors, strict=True):
        values = tensor.to(torch.float64)
        stats = (
            f"min {values.min().item():.4g}  max {values.max().item():.4g}  mean {values.mean().item():.4g}"
            if tensor.numel()
            else "empty"
        )
        print(f"  {field.name}: {list(tensor.shape)}  {stats}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from batchwire.client._credentials import open_channel
    from batchwire.client._targets import list_entries

    _target(args)  # refuses a bad target, or a bad entry of a list
    failed = 0
    # Replicas given as a list: each one's health; exit 0 only when all serve.
    for target in list_entries(args.target or os.environ.get("BATCHWIRE_TARGET") or DEFAULT_TARGET):
        try:
            with open_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
                )
        except grpc.RpcError as error:
            print(f"{target}: {error.code().name}: {error.details()}", file=sys.stderr)
            failed += 1
            continue
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{target}: {status}")
        failed += reply.status != health_pb2.HealthCheckResponse.SERVING
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from batchwire.client import bench

    try:
        config = bench.BenchConfig(
            target=_target(args),
            dataset=args.dataset,
            batch_size=args.batch_size,
            clients=args.clients,
            duration=args.duration,
            warmup=args.warmup,
            streams=args.streams,
            compression=args.compression,
            shuffle=args.shuffle,
            batches=args.batches,
            transport=args.transport,
        )
    except ValueError as exc:
        print(f"batchwire bench: {exc}", file=sys.stderr)
        return 2
    return bench.main(config, json_path=args.json, plot_path=args.plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchwire", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"batchwire {_version()}")
    log_help = "log level (default: $BATCHWIRE_LOG_LEVEL, else the config's, else INFO)"
    parser.add_argument(
        "--log-level",
        default=os.environ.get("BATCHWIRE_LOG_LEVEL"),
        type=str.upper,
        choices=LOG_LEVELS,
        help=log_help,
    )
    # Global options are accepted after the subcommand too (`batchwire ls --log-level
    # DEBUG`); SUPPRESS keeps a value given before it when none is given after.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS, help=log_help
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", parents=[common], help="serve the datasets of a config file"
    )
    serve.add_argument("--config", required=True, help="TOML config file")
    serve.add_argument("--host", help="address to bind (default: the config's, else 127.0.0.1)")
    port = _number(int, 0)
    serve.add_argument("--port", type=port, help="port to bind; 0 picks a free one")
    serve.add_argument(
        "--workers",
        type=_number(int, 1),
        help="worker processes (default: the config's, else one per core)",
    )
    serve.add_argument(
        "--metrics-port",
        type=port,
        help="Prometheus metrics port (default: the config's, else off)",
    )
    serve.add_argument(
        "--grace",
        type=_number(float, 0),
        help="seconds open streams get at shutdown (default: the config's)",
    )
    serve.set_defaults(func=cmd_serve)

    def client_command(name: str, help_text: str):
        sub = commands.add_parser(name, parents=[common], help=help_text)
        sub.add_argument(
            "--target",
            help="server host:port, replicas as host:port,host:port, or a gRPC name "
            f"such as dns:///name:port (default: $BATCHWIRE_TARGET or {DEFAULT_TARGET})",
        )
        sub.add_argument(
            "--connect-timeout",
            type=_number(float, 0, above=True),
            metavar="S",
            help="seconds to wait for a server never reached before "
            "(default: $BATCHWIRE_CONNECT_TIMEOUT_SECONDS, else 5)",
        )
        return sub

    client_command("ls", "list the served datasets").set_defaults(func=cmd_ls)
    inspect = client_command("inspect", "describe a dataset and one batch")
    inspect.add_argument("dataset")
    inspect.add_argument("--batch-size", type=int, default=8)
    inspect.set_defaults(func=cmd_inspect)
    bench = client_command("bench", "load test: N clients stream a dataset; throughput, latency")
    bench.add_argument("--dataset", required=True, help="dataset name, as `batchwire ls` lists it")
    bench.add_argument("--batch-size", type=int, required=True)
    bench.add_argument("--clients", type=int, default=1, help="client processes (default 1)")
    bench.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    bench.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (2)")
    bench.add_argument(
        "--batches",
        type=int,
        metavar="N",
        help="measure until each client has N batches, instead of --duration seconds",
    )
    bench.add_argument("--streams", type=int, default=1, help="parallel streams per client (1)")
    bench.add_argument("--compression", choices=["none", "lz4", "zstd"], default="none")
    bench.add_argument(
        "--transport",
        choices=["grpc", "shm", "auto"],
        default="grpc",
        help="grpc: bytes, as a remote trainer gets them (default); shm: mapped from the "
        "server's shared memory (same host); auto: shm where usable",
    )
    bench.add_argument("--shuffle", action="store_true", help="shuffled order (default: in order)")
    bench.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    bench.add_argument(
        "--plot", metavar="FILE.png", help="draw throughput over time and latency (matplotlib)"
    )
    bench.set_defaults(func=cmd_bench)
    health = client_command("health", "exit 0 only when the server is SERVING")
    health.add_argument(
        "--service", default="", help="service name to check (default: the whole server)"
    )
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        _configure_logging(args.log_level or "WARNING")
        # Only what each command needs: `health` (a Kubernetes probe) runs without torch.
        from batchwire.client._errors import BatchwireError, TargetError

        if args.connect_timeout is not None:  # the environment: bench's client processes too
            from batchwire.client._channel import CONNECT_TIMEOUT_SECONDS_ENV

            os.environ[CONNECT_TIMEOUT_SECONDS_ENV] = str(args.connect_timeout)
        try:
            return args.func(args)
        except TargetError as exc:  # a usage error, as argparse's
            print(f"batchwire {args.command}: {exc}", file=sys.stderr)
            return 2
        except BatchwireError as exc:
            print(f"batchwire {args.command}: {exc}", file=sys.stderr)
            return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
