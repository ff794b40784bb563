"""Assembles a running server: registry, worker pool, gRPC service, health, reflection, metrics.

NOTE [ Graceful shutdown ]
grpcio's own ``server.stop(grace)`` refuses every new call at once (health
checks included) and then cancels open calls without saying where to resume
(grpcio 1.85 reports UNAVAILABLE "Cancelling all calls"; proxies may report
CANCELLED). batchwire drains in two steps instead:

1. health turns NOT_SERVING (orchestrators stop routing to us) and the
   service refuses new streams with UNAVAILABLE; health checks still answer;
2. open streams go on for ``grace_seconds``; a stream still open then ends
   with UNAVAILABLE naming the batch to resume at, which a client treats as
   "reconnect elsewhere". Only then is the gRPC server stopped and the worker
   pool closed. A stream blocked in flow control (a trainer that stopped
   reading) cannot see the deadline; grpcio's stop cancels it, and the
   client resumes from its own position all the same.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from batchwire.server.config import Config
from batchwire.server.metrics import Metrics
from batchwire.server.pool import WorkerPool
from batchwire.server.registry import DatasetRegistry
from batchwire.server.security import TokenAuthInterceptor, load_tokens, server_credentials
from batchwire.server.service import SERVICE_NAME, BatchService
from batchwire.v1 import batchwire_pb2

log = logging.getLogger(__name__)


def bind_error(host: str, port: int) -> OSError:
    """Why ``host:port`` could not be bound: ``errno.EADDRINUSE`` when a socket listens there."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return OSError(errno.EADDRINUSE, f"port {port} is in use")
        return OSError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror or exc}")
    return OSError(f"cannot bind {host}:{port}")


class BatchwireServer:
    """A server built from a config; ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        config: Config,
        *,
        host: str | None = None,
        port: int | None = None,
        workers: int | None = None,
    ) -> None:
        settings = config.server
        self.config = config
        self.registry = DatasetRegistry(config)  # raises ConfigError before anything starts
        self.pool = WorkerPool(config, workers or settings.workers, shm_dir=settings.shm_dir)
        self.metrics = Metrics()
        self.metrics.track_pool(self.pool)
        self.health = health.HealthServicer()
        interceptors = []
        if settings.auth is not None:
            rejected = self.metrics.errors.labels(grpc.StatusCode.UNAUTHENTICATED.name)
            interceptors.append(TokenAuthInterceptor(load_tokens(settings.auth), rejected.inc))
        # A synchronous grpcio server holds one pool thread per open stream.
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_concurrent_streams + 8),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Keepalive pings find peers that vanished without closing (a killed
                # trainer, a dropped network) on long-lived streams.
                ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ],
        )
        self.service = BatchService(self.registry, self.pool, settings, self.metrics)
        self._grpc.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (
                batchwire_pb2.DESCRIPTOR.services_by_name["BatchService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._grpc,
        )
        self.host = host or settings.host
        address = f"{self.host}:{settings.port if port is None else port}"
        try:
            if settings.tls is not None:
                self.port = self._grpc.add_secure_port(address, server_credentials(settings.tls))
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError:  # grpcio's "Failed to bind to address": find out why
            self.port = 0
        if self.port == 0:
            raise bind_error(self.host, settings.port if port is None else port)
        self.metrics_port: int | None = None
        self._set_serving(False)

    def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def start(self) -> None:
        """Opens the port, warms the workers, then turns SERVING.

        Until then health answers NOT_SERVING and streams are refused with
        UNAVAILABLE, so an orchestrator's probe (and ``batchwire health``) tells
        "starting" from "ready" instead of a closed port from an open one.
        """
        settings = self.config.server
        self._grpc.start()
        if settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(
                settings.metrics_host or self.host, settings.metrics_port
            )
        self.pool.start()
        self._warm_up()
        self.service.open()
        self._set_serving(True)

    def _warm_up(self) -> None:
        # One single-sample batch per worker and dataset: every worker imports
        # and opens its datasets now, not on some trainer's first batch.
        workers = len(self.pool.pids)
        pending = [
            (name, self.pool.submit(name, [[0]]))
            for name, entry in self.registry.entries.items()
            if entry.length
            for _ in range(workers)
        ]
        for name, future in pending:
            try:
                future.result()
            except Exception as exc:  # a broken item fails its streams later, with INTERNAL
                log.warning("warm-up of dataset %r failed: %s", name, exc)

    def stop(self, grace: float | None = None) -> None:
        """Drains (see NOTE [ Graceful shutdown ]), then stops gRPC, workers and metrics."""
        grace = self.config.server.grace_seconds if grace is None else grace
        self._set_serving(False)
        self.service.begin_drain(grace)
        deadline = time.monotonic() + grace + 2.0  # streams notice the deadline within a poll
        while self.service.active_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        self._grpc.stop(1.0).wait()
        self.pool.close()
        self.metrics.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._grpc.wait_for_termination(timeout)
