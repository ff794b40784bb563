"""k streams over interleaved positions, merged back into one ordered stream.

Stream ``j`` of ``k`` carries positions ``j, j + k, j + 2k, ...`` (of its
share), so taking one batch from each stream in turn restores the order.
One thread per stream reads ahead into a queue of at most ``buffer`` batches:
client memory stays bounded at ``k * buffer`` batches, and a slow consumer
stalls the streams through gRPC flow control rather than growing a queue.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_POLL_SECONDS = 0.1  # how often a blocked thread or consumer checks that the other side is alive


class _End:
    """A stream finished."""


class _Failed:
    """A stream raised; the consumer re-raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def merge_in_order(
    sources: list[Callable[[threading.Event], Iterator[tuple[int, Any]]]],
    *,
    buffer: int = 2,
    name: str = "stream",
) -> Iterator[tuple[int, Any]]:
    """Yields the items of ``sources`` round-robin (source 0, 1, ..., k-1, 0, ...).

    Each source is called with a stop event (set when the consumer goes away)
    and runs on its own thread. Ends at the first source that ends: sources
    are interleaved, so the ones after it have nothing left either.
    """
    stop = threading.Event()
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
        # The threads see `stop` at their next put or backoff wait and close their
        # streams; they are daemons, so none outlives the process either way.
        stop.set()


def _pump(
    source: Callable[[threading.Event], Iterator[Any]],
    q: queue.Queue,
    stop: threading.Event,
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
