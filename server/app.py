"""Assembles a running server: registry, executor, gRPC service, health, reflection, metrics.

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

NOTE [ The event loop ]
The gRPC server is ``grpc.aio``'s, on an asyncio event loop in a thread of its
own (so the API, and ``batchwire serve``'s main thread, stay synchronous). A
call waiting on its client or on a worker holds no thread: health,
reflection and the batch service's methods are coroutines, and blocking work
goes to bounded pools (service.py). grpcio's synchronous server held one
thread per open call, of ``max_concurrent_streams + 8``: as many idle
reflection or health-watch streams, which need no token, starved health
checks and batch streams alike.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from batchwire.server.config import Config, ServerConfig
from batchwire.server.dashboard import DashboardPages
from batchwire.server.decoding import DecodeInterceptor
from batchwire.server.executor import Executor, make_executor
from batchwire.server.metrics import Metrics
from batchwire.server.monitor import Monitor
from batchwire.server.registry import DatasetRegistry
from batchwire.server.security import TokenAuthInterceptor, load_tokens, server_credentials
from batchwire.server.service import SERVICE_NAME, BatchService
from batchwire.v1 import batchwire_pb2

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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


def connection_age_options(settings: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's max connection age: a connection older than ``max_connection_age_seconds``
    is sent GOAWAY (its streams go on for ``max_connection_age_grace_seconds``, then
    end UNAVAILABLE and resume), so long-lived clients re-resolve and spread onto
    replicas that joined. grpc jitters the age by +-10% so clients do not move in step."""
    if not settings.max_connection_age_seconds:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_seconds * 1000)),
    ]


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
        self.executor: Executor = make_executor(config, workers)  # [server] executor
        self.metrics = Metrics()
        self.metrics.track_pool(self.executor)
        self.monitor = Monitor(self.metrics, summary_seconds=settings.summary_seconds)
        self.service = BatchService(self.registry, self.executor, settings, self.metrics)
        self.host = host or settings.host
        self._requested_port = settings.port if port is None else port
        address = f"{self.host}:{self._requested_port}"
        self._stopped = threading.Event()
        self._serving = False  # started and not draining (the pool's health aside)
        self._health_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="batchwire-grpc", daemon=True
        )
        self._loop_thread.start()
        try:
            self.port = self._on_loop(self._build(address))
        except BaseException:
            self._stop_loop()
            raise
        self.metrics_port: int | None = None

    async def _build(self, address: str) -> int:
        """The aio server with its services, bound to ``address``; returns the port."""
        settings = self.config.server
        self.health = health.aio.HealthServicer()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # Token check first: a call without one is refused before its bytes are decoded.
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if settings.auth is not None:
            rejected = self.metrics.errors.labels(grpc.StatusCode.UNAUTHENTICATED.name)
            interceptors.append(TokenAuthInterceptor(load_tokens(settings.auth), rejected.inc))
        undecodable = self.metrics.errors.labels(grpc.StatusCode.INVALID_ARGUMENT.name)
        interceptors.append(DecodeInterceptor(undecodable.inc))
        self._grpc = grpc.aio.server(
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
                *connection_age_options(settings),
            ],
        )
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
        try:
            if settings.tls is not None:
                port = self._grpc.add_secure_port(address, server_credentials(settings.tls))
            else:
                port = self._grpc.add_insecure_port(address)
        except RuntimeError:  # grpcio's "Failed to bind to address": find out why
            port = 0
        if port == 0:
            raise bind_error(self.host, self._requested_port)
        # Names this replica in DatasetInfo: its address, or its host name when bound to all.
        wildcard = self.host in ("0.0.0.0", "::", "[::]", "")
        self.service.replica = f"{socket.gethostname() if wildcard else self.host}:{port}"
        return port

    @property
    def pool(self) -> Executor:
        """The executor (its old name: ``pool.size`` is the workers alive)."""
        return self.executor

    def _on_loop(self, coroutine: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Runs ``coroutine`` on the server's event loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def _set_serving(self, serving: bool | None = None) -> None:
        """``serving``: started and not draining (None: unchanged); the executor's health counts too.

        Callable from any thread, the event loop's and the pool's included.
        """
        with self._health_lock:
            if serving is not None:
                self._serving = serving
            # See NOTE [ Supervision ] in pool.py.
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if self._serving and self.executor.failure is None
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
        if not self._loop.is_running():
            return  # stopped: nobody can ask any more
        if threading.current_thread() is self._loop_thread:
            self._loop.create_task(self._set_health(status))
        else:
            self._on_loop(self._set_health(status), timeout=10)

    def _executor_health_changed(self, failure: str | None) -> None:
        """Health follows the executor: NOT_SERVING while it cannot build batches."""
        self._set_serving()

    def start(self) -> None:
        """Opens the port, warms the workers, then turns SERVING.

        Until then health answers NOT_SERVING and streams are refused with
        UNAVAILABLE, so an orchestrator's probe (and ``batchwire health``) tells
        "starting" from "ready" instead of a closed port from an open one.
        """
        settings = self.config.server
        self._on_loop(self._grpc.start())
        if settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(
                settings.metrics_host or self.host,
                settings.metrics_port,
                DashboardPages(self.monitor),
            )
        self.monitor.start()
        self.executor.start()
        self.executor.on_health_change(self._executor_health_changed)
        # Every worker opens its datasets now, not on some trainer's first batch.
        self.executor.warm_up(name for name, entry in self.registry.entries.items() if entry.length)
        self.service.open()
        self._set_serving(True)

    def stop(self, grace: float | None = None) -> None:
        """Drains (see NOTE [ Graceful shutdown ]), then stops gRPC, workers and metrics."""
        grace = self.config.server.grace_seconds if grace is None else grace
        self._set_serving(False)
        self.service.begin_drain(grace)
        deadline = time.monotonic() + grace + 2.0  # streams notice the deadline within a poll
        while self.service.active_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._loop.is_running():
            try:
                self._on_loop(self._grpc.stop(1.0), timeout=30)
            except TimeoutError:  # the process is ending anyway: do not hang on it
                log.warning("the gRPC server did not stop within 30 seconds")
        self._stop_loop()
        self.service.close()
        self.executor.close()
        self.monitor.close()
        self.metrics.close()
        self._stopped.set()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join()
        self._loop.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for ``stop``; True if ``timeout`` passed first (as grpcio's wait_for_termination)."""
        return not self._stopped.wait(timeout)
