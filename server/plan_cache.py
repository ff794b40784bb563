"""Batch plans remembered across requests, within one byte budget for the whole server.

A weighted draw or a dynamic packing of a million samples takes about half a
second, and every rank, parallel stream and reconnect of an epoch asks for the
same plan again; but a plan is 8 bytes per sample, and clients choose seeds,
epochs and ``num_samples``, so a cache bounded by count would let a few requests
pin gigabytes (issue 17). Bounded by bytes instead:

- the most recently used plans are kept while their bytes (plus a fixed cost
  per entry) fit in ``max_bytes``; a plan larger than that is never kept;
- a plan that some stream still holds is found again while it is held, whatever
  the budget (it is in memory anyway): identical streams share one copy;
- identical requests that arrive together compute their plan once.

So the memory plans take is at most ``max_bytes`` plus the plans of open
streams and of requests being planned.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future

from batchwire.server.config import ServerConfig
from batchwire.server.samplers import BatchPlan

ENTRY_BYTES = 1024
"""What one kept entry costs besides its arrays (key, dicts, objects): empty plans are not free."""


class PlanCache:
    """Plans by key, kept up to ``max_bytes`` (least recently used go first); thread-safe."""

    def __init__(self, max_bytes: int = ServerConfig.plan_cache_bytes) -> None:
        self._max_bytes = max_bytes
        self._kept: OrderedDict[Hashable, BatchPlan] = OrderedDict()
        self._kept_bytes = 0
        self._held: weakref.WeakValueDictionary[Hashable, BatchPlan] = weakref.WeakValueDictionary()
        self._computing: dict[Hashable, Future[BatchPlan]] = {}
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def kept_bytes(self) -> int:
        """Bytes of the kept plans (entry costs included); never above ``max_bytes``."""
        return self._kept_bytes

    def __len__(self) -> int:
        return len(self._kept)

    def resize(self, max_bytes: int) -> None:
        """Sets the budget, dropping the least recently used plans beyond it."""
        with self._lock:
            self._max_bytes = max_bytes
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._kept_bytes = 0

    def get(self, key: Hashable, compute: Callable[[], BatchPlan]) -> BatchPlan:
        """The plan of ``key``: kept, held by a stream, being computed, or ``compute()``-d now.

        ``compute``'s exception (an invalid request) reaches every caller that waited on it.
        """
        with self._lock:
            plan = self._kept.get(key)
            if plan is None:
                plan = self._held.get(key)
            if plan is not None:
                self._keep(key, plan)
                return plan
            pending = self._computing.get(key)
            if pending is None:
                future: Future[BatchPlan] = Future()
                self._computing[key] = future
        if pending is not None:
            return pending.result()  # the first caller computes; it always finishes
        try:
            plan = compute()
        except BaseException as exc:
            with self._lock:
                del self._computing[key]
            future.set_exception(exc)
            raise
        with self._lock:
            self._held[key] = plan
            self._keep(key, plan)
            del self._computing[key]
        future.set_result(plan)
        return plan

    def _keep(self, key: Hashable, plan: BatchPlan) -> None:
        """Marks ``key`` most recently used, keeping it if it fits; the lock is held."""
        if key in self._kept:
            self._kept.move_to_end(key)
            return
        cost = _cost(plan)
        if cost > self._max_bytes:
            return  # only held by its streams
        self._kept[key] = plan
        self._kept_bytes += cost
        self._evict()

    def _evict(self) -> None:
        while self._kept_bytes > self._max_bytes:
            _, oldest = self._kept.popitem(last=False)
            self._kept_bytes -= _cost(oldest)


def _cost(plan: BatchPlan) -> int:
    return plan.nbytes + ENTRY_BYTES
