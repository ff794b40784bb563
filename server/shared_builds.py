"""Shared builds: concurrent streams that need the same batch get one build of it, sent to each.

A hyperparameter sweep runs several trainers with identical requests; without
this, each of their streams builds every batch again. ``SharedBuilds`` sits
between the streams and the executor (the ``Executor`` seam): a stream submits
its tasks through its own ``StreamBuilds`` handle, and a batch that another
stream's task is building, or built and still holds, is not built again.

NOTE [ Shared builds ]

*Exact, by construction.* A batch is keyed by what the executor builds it
from: the task's fields other than ``batches`` (dataset, seed, epoch: they
seed each sample's random transforms) and the batch's sample indices. A built
batch is a pure function of those (the executor contract), so whatever
request produced the plan (sampler kind, shuffle, rank, world size, batch
size, drop_last, start, stride), two streams share a batch exactly when its
bytes are the same; a different seed never shares, even in the same order.
Compression, packing, framing and the per-stream header fields (batch index,
wait and build seconds) happen in each stream, on its own copy of the header.
A field added to ``BatchTask`` joins the key by itself; it must be per task
(tasks are split into batches and regrouped here), which a test checks.

*Only where it can pay.* Streams share batches when their requests differ at
most in start, end and stride: the plan cache hands such requests one plan
object while any of them is open. A stream that is the only open one of its
plan, with nothing held that it asked for, submits straight to the executor
(tens of microseconds per task less in the gRPC process); once a second stream
of that plan opens, both go through here, and one left alone keeps going
through here while batches are held for it. What a stream submitted before the
second one opened was held for nobody: the second builds those positions
itself (the first one's reads so far, the batches in flight to its client and
its prefetch: about 10 batches of 2 MiB, with the default windows).

*Ownership.* An entry owns the ``BuiltBatch`` its build returned; each stream
gets a copy: its own header, and its own view (a slice) of the same payload
memory, which it releases once sent, as before. The entry releases the
original when it is dropped. Shared memory is unmapped (and the payload file
recycled) once the last view is gone.

*Bounded, and no stream waits on another.* A stream's task resolves as soon
as its batches are built, whoever asked first: a slow stream's reading never
holds up a fast one. Entries live while being built (at most the streams'
prefetch), then, once built, only while an open stream of the same plan (the
plan cache hands identical requests one plan object) still has the batch's
position ahead of it, within ``[server] shared_builds_bytes`` (64 MiB) over the whole server (oldest
dropped first). So a stream that falls behind, or starts later, reuses what was
built since it opened and is still held (also once the others have ended) and
builds the rest itself; a solo stream, the ranks of a DDP job
(different plans) and a trainer's parallel streams (disjoint positions) hold
nothing beyond their prefetch; when the streams end, nothing is held. A held
batch of a grouped task keeps that task's payload file mapped (at most 8 MiB,
``local.TASK_BYTES``: only small batches are grouped).

*Failures.* A batch that fails fails every stream waiting on it (a copy of
the exception each) and is not kept: a later request builds it again. Batches
of a task after its failed one were never built: those still wanted are
submitted again; a cancelled build likewise.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from functools import partial

import numpy as np

from batchwire.server._tasks import BatchFailed, BatchTask, BuildError, BuiltBatch, release_all
from batchwire.server.config import ServerConfig
from batchwire.server.executor import Executor
from batchwire.v1 import batchwire_pb2 as pb

HELD_BYTES = ServerConfig.shared_builds_bytes
"""Most payload bytes of built batches kept for streams that have not taken them yet."""

_Outcome = BuiltBatch | BaseException | None  # a request's slot: a copy, a failure, or not yet


@dataclasses.dataclass(eq=False)
class _Request:
    """One task a stream submitted: its entries, and what each has given it so far."""

    future: Future[list[BuiltBatch]]
    entries: list[_Entry] = dataclasses.field(default_factory=list)
    slots: list[_Outcome] = dataclasses.field(default_factory=list)
    open: bool = True  # False once resolved or cancelled (by whoever got there first)


@dataclasses.dataclass(eq=False)
class _Build:
    """One task submitted to the executor: the entries it builds, in order."""

    task: BatchTask
    entries: list[_Entry]
    future: Future[list[BuiltBatch]] | None = None


@dataclasses.dataclass(eq=False)
class _Entry:
    """One batch, by identity: being built (``build``), or built (``batch``)."""

    key: tuple[Hashable, bytes]
    dataset: str
    indices: Sequence[int]
    build: _Build | None = None
    batch: BuiltBatch | None = None
    waiting: list[tuple[_Request, int]] = dataclasses.field(default_factory=list)
    handed: int = 0  # copies handed out: all but the first are shared hits
    places: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    """(plan id, position) of each stream that asked for it: who else may want it."""
    held_for: set[int] = dataclasses.field(default_factory=set)
    """While held: the plans counted in ``SharedBuilds._held_plans`` for it."""


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(BatchTask) if f.name != "batches")


def _family(task: BatchTask) -> Hashable:
    """Everything but the index lists that a task's batches are built from."""
    return tuple([getattr(task, name) for name in _TASK_FIELDS])


def _copy(batch: BuiltBatch) -> BuiltBatch:
    """A stream's own header and view of a built batch (see NOTE [ Shared builds ])."""
    header = pb.BatchHeader()
    header.CopyFrom(batch.header)
    return dataclasses.replace(batch, header=header, payload=batch.payload[:])


def _fresh(failure: BaseException) -> BaseException:
    """A copy of a failure for one stream: streams change theirs (``BatchFailed.built``)."""
    try:
        return copy.copy(failure)
    except Exception:  # an exception type that cannot be rebuilt from its args
        return failure


class SharedBuilds:
    """Shares the batches that open streams build through ``executor`` (NOTE [ Shared builds ]).

    ``on_shared(dataset)`` is called once for each batch a stream got from a build
    another stream had asked for (a shared hit). Thread-safe.
    """

    def __init__(
        self,
        executor: Executor,
        *,
        on_shared: Callable[[str], None] = lambda dataset: None,
        held_bytes: int = HELD_BYTES,
    ) -> None:
        self.executor = executor
        self._on_shared = on_shared
        self._held_limit = held_bytes
        self._lock = threading.Lock()
        self._entries: dict[tuple[Hashable, bytes], _Entry] = {}
        self._plans: dict[int, set[StreamBuilds]] = {}  # id(plan) -> its open streams
        self._held: OrderedDict[tuple[Hashable, bytes], _Entry] = OrderedDict()
        self._held_bytes = 0
        self._held_plans: Counter[int] = Counter()  # id(plan) -> held entries it asked for

    def stream(self, plan: object, positions: range) -> StreamBuilds:
        """The handle of one stream sending ``positions`` of ``plan``; close it when it ends.

        The stream must submit its positions in order (``BatchStream`` does): that is
        how a batch's position is known, to hold it for the streams that have it ahead.
        """
        handle = StreamBuilds(self, plan, positions)
        with self._lock:
            self._plans.setdefault(id(plan), set()).add(handle)
        return handle

    @property
    def held(self) -> tuple[int, int]:
        """(entries, built batches kept for streams that have not taken them): for tests."""
        with self._lock:
            return len(self._entries), len(self._held)

    # -- a stream's side ----------------------------------------------------------

    def _submit(self, handle: StreamBuilds, task: BatchTask) -> Future[list[BuiltBatch]]:
        with self._lock:
            plan = id(handle.plan)
            # Alone: no other open stream of its plan, and nothing held that it may take
            # (the stream it shares with may have ended, leaving batches held for it).
            alone = len(self._plans.get(plan, ())) < 2 and not self._held_plans[plan]
            if alone:  # nobody to share with: straight to the executor, at no cost
                for _ in task.batches:
                    handle.advance()
        if alone:
            return self.executor.submit(task)
        family = _family(task)
        request = _Request(Future(), slots=[None] * len(task.batches))
        fresh: list[_Entry] = []
        drop: list[BuiltBatch] = []
        hits = 0
        with self._lock:
            for slot, indices in enumerate(task.batches):
                key = (family, np.asarray(indices, dtype=np.int64).tobytes())
                entry = self._entries.get(key)
                if entry is None:
                    entry = _Entry(key, task.dataset, indices)
                    self._entries[key] = entry
                    fresh.append(entry)
                entry.places.add((id(handle.plan), handle.advance()))
                request.entries.append(entry)
                if entry.batch is not None:
                    request.slots[slot], hit = self._take(entry)
                    hits += hit
                    self._keep_or_drop(entry, drop)
                else:
                    entry.waiting.append((request, slot))
        release_all(drop)
        self._count(task.dataset, hits)
        if fresh:
            self._start(task, fresh)
        request.future.add_done_callback(partial(self._cancelled, request))
        self._resolve(request)
        return request.future

    def _close(self, handle: StreamBuilds) -> None:
        """The stream ended: batches held only for it go."""
        drop: list[BuiltBatch] = []
        plan = id(handle.plan)
        with self._lock:
            streams = self._plans.get(plan, set())
            streams.discard(handle)
            if not streams:
                self._plans.pop(plan, None)
            for entry in [e for e in self._held.values() if any(p == plan for p, _ in e.places)]:
                self._keep_or_drop(entry, drop)
        release_all(drop)

    # -- builds -------------------------------------------------------------------

    def _start(self, template: BatchTask, entries: list[_Entry]) -> None:
        """Submits one executor task building ``entries`` (of ``template``'s family)."""
        task = dataclasses.replace(template, batches=[entry.indices for entry in entries])
        build = _Build(task, entries)
        with self._lock:
            for entry in entries:
                entry.build = build
        try:
            future = self.executor.submit(task)
        except Exception as exc:  # an executor's bug: the streams waiting on it fail with it
            future = Future()
            future.set_exception(exc)
        with self._lock:
            build.future = future
            unwanted = not any(entry.waiting for entry in entries)
        if unwanted:  # every stream that asked was cancelled meanwhile
            future.cancel()
        future.add_done_callback(partial(self._built, build))

    def _built(self, build: _Build, future: Future[list[BuiltBatch]]) -> None:
        """Hands a finished build's batches (or its failure) to the requests waiting on them."""
        built: list[BuiltBatch] = []
        failure: BaseException | None = None
        if not future.cancelled():
            try:
                built = future.result()
            except BatchFailed as exc:
                built, exc.built = exc.built, []
                failure = exc
            except BaseException as exc:
                failure = exc
        touched: list[_Request] = []
        again: list[_Entry] = []
        drop: list[BuiltBatch] = []
        hits = 0
        with self._lock:
            for i, entry in enumerate(build.entries):
                entry.build = None
                waiting, entry.waiting = entry.waiting, []
                if i < len(built):
                    entry.batch = built[i]
                    for request, slot in waiting:
                        request.slots[slot], hit = self._take(entry)
                        hits += hit
                    self._keep_or_drop(entry, drop)
                elif failure is not None and (
                    i == len(built) or not isinstance(failure, BuildError)
                ):
                    # This batch failed (or the executor did): it is not kept.
                    del self._entries[entry.key]
                    for request, slot in waiting:
                        request.slots[slot] = failure
                elif waiting:  # never built (after a failed batch, or cancelled): wanted still
                    entry.waiting = waiting
                    again.append(entry)
                else:
                    del self._entries[entry.key]
                touched += [request for request, _ in waiting]
        release_all(drop)
        self._count(build.task.dataset, hits)
        if again:
            self._start(build.task, again)
        for request in dict.fromkeys(touched):
            self._resolve(request)

    # -- under the lock ----------------------------------------------------------

    def _take(self, entry: _Entry) -> tuple[BuiltBatch, int]:
        """A copy of a built entry for a stream, and 1 if another stream had one (a hit).

        The caller then keeps or drops the entry (``_keep_or_drop``).
        """
        assert entry.batch is not None
        entry.handed += 1
        copied = _copy(entry.batch)
        copied.shared = entry.handed > 1
        return copied, int(copied.shared)

    def _keep_or_drop(self, entry: _Entry, drop: list[BuiltBatch]) -> None:
        """Holds a built entry while an open stream of its plan has its position ahead."""
        if entry.waiting or entry.batch is None:
            return
        if not any(
            stream.ahead(position)
            for plan, position in entry.places
            for stream in self._plans.get(plan, ())
        ):
            self._forget(entry, drop)
            return
        plans = {plan for plan, _ in entry.places} - entry.held_for
        self._held_plans.update(plans)  # now or since held, these plans asked for it
        entry.held_for |= plans
        if entry.key not in self._held:
            self._held[entry.key] = entry
            self._held_bytes += entry.batch.payload.nbytes
            while self._held_bytes > self._held_limit:  # oldest first
                self._forget(next(iter(self._held.values())), drop)

    def _forget(self, entry: _Entry, drop: list[BuiltBatch]) -> None:
        if self._held.pop(entry.key, None) is not None:
            assert entry.batch is not None
            self._held_bytes -= entry.batch.payload.nbytes
        for plan in entry.held_for:
            self._held_plans[plan] -= 1
            if not self._held_plans[plan]:
                del self._held_plans[plan]
        entry.held_for = set()
        del self._entries[entry.key]
        if entry.batch is not None:
            drop.append(entry.batch)  # released outside the lock: copies keep their views
            entry.batch = None

    def _detach(self, request: _Request, cancel: list[Future[list[BuiltBatch]]]) -> list[_Outcome]:
        """Closes ``request``: it waits on nothing any more; returns what it got."""
        request.open = False
        for slot, entry in enumerate(request.entries):
            if request.slots[slot] is None and (request, slot) in entry.waiting:
                entry.waiting.remove((request, slot))
                build = entry.build
                if build and build.future and not any(e.waiting for e in build.entries):
                    cancel.append(build.future)  # nobody wants any of its batches now
        slots, request.slots = request.slots, []
        return slots

    # -- a request's outcome ---------------------------------------------------

    def _resolve(self, request: _Request) -> None:
        """Resolves the request's future once its batches are in, or one before them failed."""
        cancel: list[Future[list[BuiltBatch]]] = []
        with self._lock:
            if not request.open:
                return
            failed_at = len(request.slots)
            for slot, got in enumerate(request.slots):
                if got is None:
                    return  # not yet
                if isinstance(got, BaseException):
                    failed_at = slot
                    break
            slots = self._detach(request, cancel)
        for future in cancel:
            future.cancel()
        built = [got for got in slots[:failed_at] if isinstance(got, BuiltBatch)]
        release_all(got for got in slots[failed_at + 1 :] if isinstance(got, BuiltBatch))
        try:
            if failed_at == len(slots):
                request.future.set_result(built)
                return
            failure = slots[failed_at]
            assert isinstance(failure, BaseException)
            if not built:
                request.future.set_exception(_fresh(failure))
            elif isinstance(failure, BuildError):  # the batches before it still go out
                request.future.set_exception(BatchFailed(str(failure), built))
                built = []
            else:  # UNAVAILABLE: the stream resumes at its task's first batch
                release_all(built)
                request.future.set_exception(_fresh(failure))
        except InvalidStateError:  # the stream cancelled it meanwhile: its copies go back
            release_all(built)

    def _cancelled(self, request: _Request, future: Future[list[BuiltBatch]]) -> None:
        if not future.cancelled():
            return
        cancel: list[Future[list[BuiltBatch]]] = []
        with self._lock:
            if not request.open:
                return  # resolving: ``_resolve`` gives its copies back
            slots = self._detach(request, cancel)
        release_all(got for got in slots if isinstance(got, BuiltBatch))
        for build in cancel:
            build.cancel()  # a no-op once started: ``_built`` keeps or drops the result

    def _count(self, dataset: str, hits: int) -> None:
        for _ in range(hits):
            self._on_shared(dataset)


class StreamBuilds:
    """One stream's way to the executor through ``SharedBuilds``: ``submit`` and ``group_size``
    as ``Executor`` has them; ``close`` (or ``with``) when the stream ends."""

    def __init__(self, shared: SharedBuilds, plan: object, positions: range) -> None:
        self.plan = plan
        # Positions other than a range (O(1) `in` and `index`) are not followed: such a
        # stream shares what is being built, and nothing is held for it.
        self._positions = positions if isinstance(positions, range) else range(0)
        self._submitted = 0  # positions submitted so far, in order
        self._shared = shared

    def advance(self) -> int:
        """The position of the next batch submitted (unknown: -1, wanted by nobody)."""
        index, self._submitted = self._submitted, self._submitted + 1
        return self._positions[index] if index < len(self._positions) else -1

    def ahead(self, position: int) -> bool:
        """Whether this stream has yet to submit ``position``."""
        return position in self._positions and self._positions.index(position) >= self._submitted

    def submit(self, task: BatchTask) -> Future[list[BuiltBatch]]:
        return self._shared._submit(self, task)

    def group_size(self, batch_bytes: int, build_seconds: float | None) -> int:
        return self._shared.executor.group_size(batch_bytes, build_seconds)

    def close(self) -> None:
        self._shared._close(self)

    def __enter__(self) -> StreamBuilds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
