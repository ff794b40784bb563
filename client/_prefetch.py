"""``DevicePrefetcher``: reads batches ahead and moves them to the GPU through reused pinned buffers.

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

_told_no_cuda = threading.Event()  # "CUDA is absent, using the CPU" is logged once per process


class DevicePrefetcher:
    """Yields the batches of ``iterable`` on ``device``, fetching ``depth - 1`` batches ahead.

    ``depth`` batches are in flight at a time: while the training step works on
    batch N, batches N+1 ... N+depth-1 are already fetched and on their way.
    On a CUDA device each batch (any nesting of dicts, lists, tuples and
    tensors; other leaves pass through) is copied into pinned host buffers,
    then to the device with ``non_blocking`` copies on a CUDA stream of its
    own. On any other device the read-ahead is the same; only the pinned
    staging and the CUDA stream are left out (CPU batches pass through as
    they are, other devices get a plain ``.to(device)``).

    Memory held (CUDA): ``depth`` sets of pinned host buffers, each as large as
    one batch's CPU tensors (allocated at the first batch, reused, and
    re-allocated only when a tensor's shape or dtype changes), plus up to
    ``depth`` batches on the device besides the one the caller holds.

    ``state_dict()`` is the position of the training loop, not of the read-ahead:
    it names the first batch this prefetcher has not yet handed out (see
    ``state_dict``), so a checkpoint taken inside the loop resumes exactly.

    Args:
        iterable: yields batches of CPU tensors (e.g. a ``RemoteDataset``).
        device: where the batches go, e.g. ``"cuda"``, ``"cuda:1"`` or ``"cpu"``.
        depth: batches in flight; 2 overlaps one copy with one step.
        cpu_fallback: with a CUDA ``device`` and no CUDA available, use the CPU
            (logged once) instead of raising.

    Raises:
        RuntimeError: ``device`` is a CUDA device, CUDA is not available and
            ``cpu_fallback`` is False.
    """

    def __init__(
        self,
        iterable: Iterable[Any],
        device: torch.device | str,
        depth: int = 2,
        *,
        cpu_fallback: bool = False,
    ) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth should be a positive integer, but got depth={depth!r}")
        self.iterable = iterable
        self.device = _usable_device(torch.device(device), cpu_fallback)
        self.depth = depth
        self._slots: list[_Slot] = []
        self._stream: torch.cuda.Stream | None = None
        self._yielded_state: dict[str, Any] | None = None  # the pass underway's position
        self._drop_read_ahead = False  # set_batch_size: the batches in flight are stale

    @property
    def enabled(self) -> bool:
        """True when batches are copied to a CUDA device (through pinned buffers)."""
        return self.device.type == "cuda"

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

    # -- position ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The iterable's state as of the last batch handed out (not the last one fetched).

        During a pass: the state the iterable had right after yielding the batch
        the loop holds, so resuming from it starts at the first batch the loop
        has not received, whatever ``depth``. Otherwise: the iterable's own
        ``state_dict()``.

        Raises:
            TypeError: the iterable has no ``state_dict()``.
        """
        if self._yielded_state is not None:
            return self._yielded_state
        return self._stateful().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads ``state`` into the iterable: its next pass continues there."""
        self._stateful().load_state_dict(state)
        self._yielded_state = None

    def set_batch_size(self, batch_size: int) -> None:
        """The iterable's ``set_batch_size``, from the first batch the loop has not received.

        The batches read ahead at the old size are dropped, and the next batch
        handed out has the new size (see ``RemoteDataset.set_batch_size``).

        Raises:
            TypeError: the iterable has no ``set_batch_size()``.
        """
        setter = getattr(self.iterable, "set_batch_size", None)
        if not callable(setter):
            raise TypeError(
                f"DevicePrefetcher.set_batch_size() needs an iterable with set_batch_size() "
                f"(e.g. a RemoteDataset), but got {type(self.iterable).__name__}"
            )
        if self._yielded_state is None:
            setter(batch_size)
        elif setter(batch_size, at=self._yielded_state):
            self._drop_read_ahead = True

    def _stateful(self) -> Any:
        if not callable(getattr(self.iterable, "state_dict", None)):
            raise TypeError(
                f"DevicePrefetcher.state_dict() needs an iterable with state_dict() and "
                f"load_state_dict() (e.g. a RemoteDataset), but got {type(self.iterable).__name__}"
            )
        return self.iterable

    # -- iteration --------------------------------------------------------------

    # NOTE [ Prefetch pipeline ]
    # Batch N goes to slot N % depth. On CUDA: host copy into the slot's pinned
    # buffers, then cudaMemcpyAsync on our copy stream, then an event on that stream.
    # - Before the host overwrites a slot's pinned buffers it waits (on the host)
    #   for that slot's previous event: the earlier async copy out of them is done.
    # - Before a batch is handed out, the caller's current stream waits (on the
    #   GPU, not the host) for the batch's event, and each device tensor is
    #   `record_stream`-ed on the caller's stream, so the caching allocator does
    #   not reuse its memory while the caller's kernels may still read it.
    # Each fetched batch carries the iterable's state taken right after it was
    # fetched; handing the batch out makes that state the prefetcher's.
    def __iter__(self) -> Iterator[Any]:
        if self.enabled and self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        while len(self._slots) < self.depth:
            self._slots.append(_Slot())
        stateful = callable(getattr(self.iterable, "state_dict", None))
        source = iter(self.iterable)
        in_flight: deque[_Loaded] = deque()
        fetched = 0

        def fetch() -> bool:
            nonlocal fetched
            batch = next(source, _DONE)
            if batch is _DONE:
                return False
            state = self.iterable.state_dict() if stateful else None  # type: ignore[attr-defined]
            slot = self._slots[fetched % self.depth]
            fetched += 1
            in_flight.append(slot.load(batch, self.device, self._stream, state))
            return True

        try:
            while len(in_flight) < self.depth and fetch():
                pass
            while in_flight:
                loaded = in_flight.popleft()
                self._yielded_state = loaded.state
                yield loaded.hand_out(self.device)
                if self._drop_read_ahead:  # fetched at the old batch size: fetch again
                    self._drop_read_ahead = False
                    in_flight.clear()
                    while len(in_flight) < self.depth and fetch():
                        pass
                else:
                    fetch()
        finally:
            self._yielded_state = None  # the pass is over: the iterable's own state again


_DONE = object()


def _usable_device(device: torch.device, cpu_fallback: bool) -> torch.device:
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        if not cpu_fallback:
            raise RuntimeError(
                f"DevicePrefetcher: device {str(device)!r} needs CUDA, but "
                f"torch.cuda.is_available() is False (torch {torch.__version__}); pass "
                f"device='cpu', or cpu_fallback=True to use the CPU where CUDA is absent"
            )
        if not _told_no_cuda.is_set():
            _told_no_cuda.set()
            log.warning(
                "DevicePrefetcher: CUDA is not available; using the CPU (cpu_fallback=True)"
            )
        return torch.device("cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"DevicePrefetcher: device {str(device)!r} does not exist; "
            f"this process sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


class _Loaded:
    """A fetched batch on its way to the device, and the iterable's state after it."""

    def __init__(
        self,
        batch: Any,
        state: dict[str, Any] | None,
        event: torch.cuda.Event | None = None,
        leaves: list[Any] | None = None,
    ) -> None:
        self.batch, self.state, self.event, self.leaves = batch, state, event, leaves or []

    def hand_out(self, device: torch.device) -> Any:
        if self.event is not None:  # CUDA: the caller's stream waits for the copy
            consumer = torch.cuda.current_stream(device)
            consumer.wait_event(self.event)
            for leaf in self.leaves:
                if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda":
                    leaf.record_stream(consumer)
        return self.batch


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
        self,
        batch: Any,
        device: torch.device,
        stream: torch.cuda.Stream | None,
        state: dict[str, Any] | None,
    ) -> _Loaded:
        """Starts moving ``batch`` to ``device``; CPU batches stay as they are."""
        if device.type == "cpu":
            return _Loaded(batch, state)
        leaves, rebuild = flatten(batch)
        if stream is None:  # a device other than CUDA: a plain copy
            moved = [v.to(device) if isinstance(v, torch.Tensor) else v for v in leaves]
            return _Loaded(rebuild(moved), state)
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
        return _Loaded(rebuild(out), state, self.event, out)

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
