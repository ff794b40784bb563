"""Runs the real ``batchwire serve`` command as a child process, for tests."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from batchwire.server.launch import ServeProcess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def batchwire_command() -> list[str]:
    return [sys.executable, "-m", "batchwire.cli"]


class ServerProcess(ServeProcess):
    """``batchwire serve --config FILE`` on 127.0.0.1 with 2 workers unless told otherwise."""

    def __init__(
        self,
        config: Path | str,
        *,
        port: int = 0,
        workers: int = 2,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(config, port=port, workers=workers, extra=extra or (), env=env)

    def start(self, timeout: float = 60.0) -> ServerProcess:
        super().start(timeout)
        return self
