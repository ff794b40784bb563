"""Runs ``batchwire serve`` as a child process and waits until it serves.

For programs that bring their own server: the examples, the benchmarks and
the tests. The bound port is read from the "serving" line that ``serve``
prints once it is healthy (so ``port=0`` works), and the output is drained by
a thread for the whole life of the process, so a chatty server never blocks
on a full pipe.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_SERVING = re.compile(r"batchwire: serving .* on (?P<host>[^ ]+):(?P<port>\d+) ")


class ServeProcess:
    """``batchwire serve --config FILE``; ``target`` is ``host:port`` once started."""

    def __init__(
        self,
        config: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int | None = None,
        log_level: str | None = None,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = Path(config)
        self.host = host
        self.port = port
        self.workers = workers
        self.log_level = log_level
        self.extra = list(extra)
        self.env = dict(env or {})
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        """Every line the server printed so far (stdout and stderr)."""

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "batchwire.cli"]
        if self.log_level:
            command += ["--log-level", self.log_level]
        command += ["serve", "--config", str(self.config), "--host", self.host]
        command += ["--port", str(self.port)]
        if self.workers is not None:
            command += ["--workers", str(self.workers)]
        return command + self.extra

    def start(self, timeout: float = 120.0) -> ServeProcess:
        """Starts the server and returns once it serves; raises with its output if it does not."""
        self.output = []
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **self.env},
        )
        serving = threading.Event()

        def drain(stream) -> None:
            for line in stream:
                self.output.append(line)
                match = _SERVING.search(line)
                if match:
                    self.port = int(match["port"])
                    serving.set()

        threading.Thread(target=drain, args=(self.process.stdout,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not serving.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("batchwire serve did not start:\n" + "".join(self.output))
        return self

    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a graceful drain), then SIGKILL after ``timeout``; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
