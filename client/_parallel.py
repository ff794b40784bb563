"""k streams over interleaved positions, merged back into one ordered stream.

Stream ``j`` of ``k`` carries positions ``j, j + k, j + 2k, ...`` (of its
share), so taking one batch from each stream in turn restores the order.
One thread per stream reads ahead into a queue of at most ``buffer`` batches:
client memory stays bounded at ``k * buffer`` batches, and a slow consumer
stalls the streams through gRPC flow control rather than growing a queue.

When the consumer goes away (a ``break``, a new batch size), the streams' calls
are cancelled and their threads joined before it gets control back: a process
that forks next (DataLoader workers) must not be copied while other threads are
inside grpc, whose fork handlers then stand aside ("skipping fork() handlers")
and the child may crash.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.1  # how often a blocked thread or consumer checks that the other side is alive
# How long a consumer that left waits for its stream threads; they only have to see
# the stop and close cancelled calls, unless one is inside a unary call (its own timeout).
_JOIN_SECONDS = 10.0


class Stop:
    """The consumer's request that its streams stop: a ``threading.Event`` that also
    runs what the streams registered (their calls' ``cancel``), so that a thread
    blocked in a gRPC read wakes at once, not at the server's next message (or never,
    if the server hangs)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            hooks, self._hooks = list(self._hooks.values()), {}
        for hook in hooks:
            hook()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def on_set(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Runs ``hook`` when the stop is set (now, if it is); returns the undo."""
        with self._lock:
            if not self._event.is_set():
                key = next(self._keys)
                self._hooks[key] = hook
                return lambda: self._hooks.pop(key, None)
        hook()
        return lambda: None


class _End:
    """A stream finished."""


class _Failed:
    """A stream raised; the consumer re-raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def merge_in_order(
    sources: list[Callable[[Stop], Iterator[tuple[int, Any]]]],
    *,
    buffer: int = 2,
    name: str = "stream",
) -> Iterator[tuple[int, Any]]:
    """Yields the items of ``sources`` round-robin (source 0, 1, ..., k-1, 0, ...).

    Each source is called with a ``Stop`` (set when the consumer goes away) and
    runs on its own thread; the threads have ended when this generator closes. Ends at the first source that ends: sources
    are interleaved, so the ones after it have nothing left either.
    """
    stop = Stop()
    queues: list[queue.Queue] = [queue.Queue(maxsize=buffer) for _ in sources]
    threads = [
        threading.Thread(
            target=_pump,
            args=(source, queues[j], stop, f"{name} {j + 1} of {len(sources)}"),
            name=f"batchwire-{name}-{j}",
            daemon=True,
        )
        for j, source in enumerate(sources)
    ]
    for thread in threads:
        thread.start()
    try:
        while True:
            for j, q in enumerate(queues):
                item = _get(q, threads[j])
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
    finally:
        # Cancels the calls: the threads see `stop` at once, wherever they wait.
        stop.set()
        for thread in threads:
            thread.join(timeout=_JOIN_SECONDS)
            if thread.is_alive():  # a daemon: it ends with the process at the latest
                log.warning(
                    "%s did not stop within %.0fs of its consumer", thread.name, _JOIN_SECONDS
                )


def _pump(
    source: Callable[[Stop], Iterator[Any]],
    q: queue.Queue,
    stop: Stop,
    where: str,
) -> None:
    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    iterator = source(stop)
    try:
        for item in iterator:
            if not put(item):
                return
        put(_End())
    except BaseException as error:
        error.add_note(f"(raised in {where})")
        put(_Failed(error))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _get(q: queue.Queue, thread: threading.Thread) -> Any:
    while True:
        try:
            return q.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if not thread.is_alive() and q.empty():
                raise RuntimeError(f"{thread.name} ended without a result") from None
