"""A worker process as the pool holds it: started from the forkserver, watched and killed by pidfd.

Why not multiprocessing's ``sentinel``: a forkserver child's sentinel is a
pipe from the forkserver, so it fires when the *forkserver* dies while the
worker lives on. The pool then took live workers for dead and removed the
payload files they were still writing; a file written after its removal
stayed in /dev/shm until shutdown (issue 17: 6 in 20 SIGKILLs of the
forkserver). A pidfd becomes readable once the worker itself has exited,
whoever its parent is by then (a worker outlives its forkserver and goes on
serving), and a signal sent through it cannot reach a recycled pid. Where
there are no pidfds (not Linux 5.3+), the sentinel and the pid stand in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass
class WorkerProcess:
    """One worker: its process, the pool's end of its pipe, and its pidfd (None: none here)."""

    process: Any
    conn: Connection
    pidfd: int | None
    released: bool = False
    """Its pidfd is closed: it has exited and been dealt with."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        """Readable once the worker has exited."""
        return self.pidfd if self.pidfd is not None else self.process.sentinel

    def exited(self, timeout: float = 0.0) -> bool:
        return self.released or bool(wait([self.sentinel], timeout))

    def kill(self) -> None:
        if self.released:
            return
        if self.pidfd is None:
            self.process.kill()
            return
        with contextlib.suppress(ProcessLookupError):  # already gone
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def exitcode(self, timeout: float) -> int | None:
        """The exit code the forkserver reports (255 when the forkserver itself is gone)."""
        self.process.join(timeout)
        return self.process.exitcode

    def release(self) -> None:
        """Closes the pidfd (the worker has exited, or is being abandoned at close)."""
        if self.pidfd is not None and not self.released:
            os.close(self.pidfd)
        self.released = True


def start_worker(
    context: Any, target: Callable[..., None], args: tuple[Any, ...], name: str
) -> WorkerProcess:
    """Starts ``target(*args, conn)`` in a new process; on failure, leaves no process or fd behind."""
    ours, theirs = context.Pipe(duplex=True)
    process = None
    try:
        process = context.Process(target=target, args=(*args, theirs), name=name, daemon=True)
        process.start()
        pidfd = _pidfd_open(process.pid)
    except BaseException:
        ours.close()
        if process is not None and process.pid is not None:
            process.kill()  # started, but we could not watch it
        raise
    finally:
        theirs.close()
    return WorkerProcess(process, ours, pidfd)


def _pidfd_open(pid: int) -> int | None:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:  # a kernel older than 5.3
            return None
        raise
