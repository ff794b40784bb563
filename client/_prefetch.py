"""``DevicePrefetcher``: moves batches to the GPU through reused pinned buffers.

See NOTE [ Prefetch pipeline ] below for the synchronisation.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

_told_no_cuda = threading.Event()  # "CUDA is absent" is logged once per process


class DevicePrefetcher:
    """Yields the batches of ``iterable`` on ``device``, copying batch N+1 while N is used.

    Each batch (any nesting of dicts, lists, tuples and tensors; other leaves
    pass through) is copied into pinned host buffers, then to the device with
    ``non_blocking`` copies on a CUDA stream of its own. ``depth`` batches are
    in flight at a time: while the training step works on batch N, batches
    N+1 ... N+depth-1 are already on their way.

    Memory held: ``depth`` sets of pinned host buffers, each as large as one
    batch's CPU tensors (allocated at the first batch, reused, and re-allocated
    only when a tensor's shape or dtype changes), plus up to ``depth`` batches
    on the device besides the one the caller holds.

    Without CUDA (or with a non-CUDA ``device``) the batches pass through
    unchanged, and the first such pass says so once in the log.

    Args:
        iterable: yields batches of CPU tensors (e.g. a ``RemoteDataset``).
        device: a CUDA device, e.g. ``"cuda"`` or ``"cuda:1"``.
        depth: batches in flight; 2 overlaps one copy with one step.
    """

    def __init__(self, iterable: Iterable[Any], device: torch.device | str, depth: int = 2) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth should be a positive integer, but got depth={depth!r}")
        self.iterable = iterable
        self.device = torch.device(device)
        self.depth = depth
        self._slots: list[_Slot] = []
        self._stream: torch.cuda.Stream | None = None

    @property
    def enabled(self) -> bool:
        """True when batches are actually copied to a CUDA device."""
        return self.device.type == "cuda" and torch.cuda.is_available()

    @property
    def pinned_bytes(self) -> int:
        """Bytes of pinned host memory this prefetcher holds now."""
        return sum(slot.nbytes for slot in self._slots)

    @property
    def pinned_allocations(self) -> int:
        """How many pinned buffers were allocated so far (reuse keeps this flat)."""
        return sum(slot.allocations for slot in self._slots)

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if not self.enabled:
            if not _told_no_cuda.is_set():
                _told_no_cuda.set()
                if self.device.type == "cuda":
                    log.warning(
                        "DevicePrefetcher: CUDA is not available; batches pass through unchanged"
                    )
                else:
                    log.info(
                        "DevicePrefetcher: device %r is not a CUDA device; batches pass through unchanged",
                        str(self.device),
                    )
            yield from self.iterable
            return
        yield from self._prefetch()

    # NOTE [ Prefetch pipeline ]
    # Batch N goes to slot N % depth: host copy into the slot's pinned buffers,
    # then cudaMemcpyAsync on our copy stream, then an event on that stream.
    # - Before the host overwrites a slot's pinned buffers it waits (on the host)
    #   for that slot's previous event: the earlier async copy out of them is done.
    # - Before a batch is handed out, the caller's current stream waits (on the
    #   GPU, not the host) for the batch's event, and each device tensor is
    #   `record_stream`-ed on the caller's stream, so the caching allocator does
    #   not reuse its memory while the caller's kernels may still read it.
    def _prefetch(self) -> Iterator[Any]:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        while len(self._slots) < self.depth:
            self._slots.append(_Slot())
        source = iter(self.iterable)
        in_flight: deque[tuple[Any, list[Any], torch.cuda.Event]] = deque()
        issued = 0

        def issue() -> bool:
            nonlocal issued
            batch = next(source, _DONE)
            if batch is _DONE:
                return False
            slot = self._slots[issued % self.depth]
            issued += 1
            in_flight.append(slot.load(batch, self.device, self._stream))
            return True

        while len(in_flight) < self.depth and issue():
            pass
        while in_flight:
            rebuild, leaves, event = in_flight.popleft()
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda":
                    leaf.record_stream(consumer)
            yield rebuild(leaves)
            issue()


_DONE = object()


class _Slot:
    """One batch's pinned host buffers and the event of the last copy out of them."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.event: torch.cuda.Event | None = None
        self.allocations = 0

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def load(
        self, batch: Any, device: torch.device, stream: torch.cuda.Stream
    ) -> tuple[Callable[[list[Any]], Any], list[Any], torch.cuda.Event]:
        """Starts the copy of ``batch`` to ``device``; returns its rebuild, leaves and event."""
        leaves, rebuild = flatten(batch)
        cpu = [i for i, leaf in enumerate(leaves) if _is_cpu_tensor(leaf)]
        if self.event is not None:
            self.event.synchronize()  # the previous copy out of these buffers is done
        self._fit([leaves[i] for i in cpu])
        out = list(leaves)
        with torch.cuda.stream(stream):
            for buffer, i in zip(self.buffers, cpu, strict=True):
                buffer.copy_(leaves[i])
                out[i] = buffer.to(device, non_blocking=True)
            for i, leaf in enumerate(leaves):  # tensors on another device: no staging
                if isinstance(leaf, torch.Tensor) and i not in cpu:
                    out[i] = leaf.to(device, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        return rebuild, out, self.event

    def _fit(self, tensors: list[torch.Tensor]) -> None:
        """Keeps a buffer per tensor; allocates only where shape or dtype changed."""
        buffers = self.buffers[: len(tensors)]
        for i, tensor in enumerate(tensors):
            if i < len(buffers) and (
                buffers[i].shape == tensor.shape and buffers[i].dtype == tensor.dtype
            ):
                continue
            fresh = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.allocations += 1
            if i < len(buffers):
                buffers[i] = fresh
            else:
                buffers.append(fresh)
        self.buffers = buffers


def _is_cpu_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def flatten(batch: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Splits a nested batch into its leaves and a function that rebuilds it from new leaves.

    Dicts (any ``Mapping`` rebuilt as its type when possible), lists, tuples and
    named tuples are containers; everything else is a leaf.
    """
    leaves: list[Any] = []

    def walk(node: Any) -> Callable[[Iterator[Any]], Any]:
        if isinstance(node, Mapping):
            keys = list(node)
            parts = [walk(node[k]) for k in keys]
            kind = type(node)

            def build_map(it: Iterator[Any]) -> Any:
                values = {k: part(it) for k, part in zip(keys, parts, strict=True)}
                try:
                    return kind(values)
                except TypeError:
                    return values

            return build_map
        if isinstance(node, tuple | list):
            parts = [walk(item) for item in node]
            kind = type(node)

            def build_seq(it: Iterator[Any]) -> Any:
                items = [part(it) for part in parts]
                if hasattr(kind, "_fields"):  # a named tuple
                    return kind(*items)
                return kind(items)

            return build_seq
        leaves.append(node)
        return lambda it: next(it)

    build = walk(batch)
    return leaves, lambda new_leaves: build(iter(new_leaves))
