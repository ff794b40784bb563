"""Assembles a running server: registry, worker pool, gRPC service, health and reflection."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from batchwire.server.config import Config
from batchwire.server.pool import WorkerPool
from batchwire.server.registry import DatasetRegistry
from batchwire.server.service import SERVICE_NAME, BatchService
from batchwire.v1 import batchwire_pb2

log = logging.getLogger(__name__)

# Frames carry at most chunk_bytes of payload plus a header; leave generous room.
_MESSAGE_HEADROOM = 16 << 20


class BatchwireServer:
    """A started server; ``port`` is the bound port (useful with port 0)."""

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
        self.health = health.HealthServicer()
        max_message = settings.chunk_bytes + _MESSAGE_HEADROOM
        # A synchronous grpcio server holds one pool thread per open stream.
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_concurrent_streams + 8),
            options=[
                ("grpc.max_send_message_length", max_message),
                ("grpc.max_receive_message_length", 4 << 20),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.service = BatchService(self.registry, self.pool, settings)
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
        address = f"{host or settings.host}:{settings.port if port is None else port}"
        self.port = self._grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        self.host = host or settings.host
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
        self.pool.start()
        self._grpc.start()
        self._set_serving(True)

    def stop(self, grace: float = 5.0) -> None:
        """Reports NOT_SERVING, ends open streams after ``grace`` seconds, stops the workers."""
        self._set_serving(False)
        self._grpc.stop(grace).wait()
        self.pool.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._grpc.wait_for_termination(timeout)
