"""One stream's scheduling: which batches are being built, in what order they go out, when to stop.

A ``BatchStream`` keeps about ``prefetch_batches`` batches of its plan in the
executor (bounded memory while the client is slow), sends them in plan order
whatever finishes first, groups small quick batches a few per task (the
executor's ``group_size`` hint), checks each against ``max_batch_bytes``,
compresses, and frames them (``Outbox``). It releases every built batch once
sent or dropped, and cancels what it no longer needs when it ends (finished,
cancelled, or stopped).

It knows no gRPC: it ends with ``StreamStopped``, whose ``failure`` is typed
(the executor's failures, ``Draining``, ``BatchTooLarge``), and the service
maps that type to a status (``service.FAILURE_STATUS``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from batchwire import wire
from batchwire.server._tasks import BatchFailed, BatchTask, BuiltBatch, Unavailable, release_all
from batchwire.server.executor import Executor
from batchwire.server.outbox import Outbox
from batchwire.v1 import batchwire_pb2 as pb

POLL_SECONDS = 0.25
"""How often a stream waiting on the executor checks the drain deadline."""


class Draining(Unavailable):
    """The server is shutting down: the stream ends, the client resumes elsewhere."""


class BatchTooLarge(Exception):
    """A built batch is over ``max_batch_bytes``."""


class StreamStopped(Exception):
    """The stream ends at batch ``position`` (where a client resumes) because of ``failure``."""

    def __init__(self, failure: BaseException, position: int) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.position = position


class Plan(Protocol):
    """A stream's batches (``samplers.BatchPlan``): ``plan[b]`` is batch b's sample indices."""

    seed: int
    epoch: int

    def __getitem__(self, position: int) -> Sequence[int]: ...


@dataclass(frozen=True)
class StreamLimits:
    prefetch_batches: int
    chunk_bytes: int
    max_batch_bytes: int
    per_message: int = 1
    """Most batches packed in one message (the client's ``max_batches_per_message``)."""


@dataclass
class StreamHooks:
    """Where the stream's bytes go and what it reports; all but ``write`` optional."""

    write: Callable[[bytes], Awaitable[None]]
    compress: Callable[[pb.BatchHeader, memoryview], Awaitable[object]] | None = None
    """Compresses a payload (setting the header's sizes); None: sent as built."""
    draining: Callable[[], bool] = lambda: False
    """True once open streams must end (the drain deadline passed)."""
    on_built: Callable[[BuiltBatch], None] = lambda batch: None
    on_sent: Callable[[pb.BatchHeader], None] = lambda header: None
    on_depth: Callable[[int], None] = lambda depth: None
    """Batches built and waiting to be sent, after each task arrives."""
    on_waited: Callable[[float], None] = lambda seconds: None
    """Seconds the stream waited on the executor for a task."""
    shared: SharedPayloads | None = None
    """Same-host delivery (``shm_delivery.SharedStream``): payloads go as handles, uncompressed."""


class SharedPayloads(Protocol):
    def shareable(self, payload: memoryview) -> bool: ...
    def must_wait(self, size: int) -> bool: ...
    def has_room(self, size: int, grouped: int) -> bool: ...
    async def wait(self) -> None: ...
    def handle(self, payload: memoryview) -> bytes: ...


class BatchStream:
    """Sends ``positions`` of ``plan`` of ``dataset``, built by ``executor``; ``run`` once."""

    def __init__(
        self,
        executor: Executor,
        dataset: str,
        plan: Plan,
        positions: Iterable[int],
        limits: StreamLimits,
        hooks: StreamHooks,
        *,
        batch_bytes: int = 0,
    ) -> None:
        self._executor = executor
        self._dataset = dataset
        self._plan = plan
        self._upcoming = iter(positions)
        self._limits = limits
        self._hooks = hooks
        self._batch_bytes = batch_bytes  # the first batch's estimate (0: unknown)
        self._group = executor.group_size(batch_bytes, None)
        self._pending: deque[tuple[list[int], Future[list[BuiltBatch]]]] = deque()
        self._outbox = Outbox(limits.chunk_bytes, limits.per_message, self._sent)
        self._unsent: deque[BuiltBatch] = deque()
        """Batches handed to the outbox, in order; each released once its message is written."""

    async def run(self) -> None:
        """Sends every batch, or raises ``StreamStopped`` (or ``CancelledError``)."""
        pending = self._pending
        try:
            self._refill()
            while pending:
                # Stays in `pending` while awaited, so a cancelled stream cancels it too.
                positions, future = pending[0]
                waited = time.monotonic()
                try:
                    built, failure = await self._await(future, positions[0])
                except StreamStopped:
                    await self._flush()  # batches packed before it go out first
                    raise
                waited = time.monotonic() - waited
                self._hooks.on_waited(waited)
                pending.popleft()
                try:
                    if built:
                        seconds = sum(batch.build_seconds for batch in built) / len(built)
                        self._group = self._executor.group_size(self._batch_bytes, seconds)
                    self._refill()
                    self._hooks.on_depth(sum(len(p) for p, f in pending if f.done()))
                    # Fewer built than asked when one failed: those before it still go out.
                    for position, batch in zip(positions, built, strict=False):
                        # What the client's stats tell its data-wait by (issue 16): the
                        # wait on a task counts once, on its first batch.
                        batch.header.build_seconds = batch.build_seconds
                        batch.header.wait_seconds, waited = waited, 0.0
                        await self._send(position, batch)
                    # The next task's batches join this message when they are ready
                    # already: a message costs ~0.4 ms of grpc.aio whatever it holds.
                    if failure is not None or not (pending and pending[0][1].done()):
                        await self._flush()
                finally:
                    # Sent ones are released already; those never handed to the outbox
                    # (a failure, a cancel) now. Those waiting in it go once written.
                    waiting = {id(batch) for batch in self._unsent}
                    release_all([batch for batch in built if id(batch) not in waiting])
                if failure is not None:
                    raise StreamStopped(failure, positions[len(built)]) from failure
        finally:
            release_all(self._unsent)  # sent or not: their memory goes back now
            self._unsent.clear()
            self._drop_pending()

    def _refill(self) -> None:
        # prefetch_batches bounds single batches; grouped small ones keep 2 tasks going
        group = self._group
        max_tasks = max(1 if group == 1 else 2, -(-self._limits.prefetch_batches // group))
        while len(self._pending) < max_tasks:
            positions = list(itertools.islice(self._upcoming, group))
            if not positions:
                return
            task = BatchTask(
                self._dataset,
                [self._plan[position] for position in positions],
                seed=self._plan.seed,
                epoch=self._plan.epoch,
            )
            self._pending.append((positions, self._executor.submit(task)))

    async def _send(self, position: int, batch: BuiltBatch) -> None:
        if self._hooks.draining():
            await self._flush()  # what is packed goes out before the stream ends
            raise StreamStopped(Draining("the server is shutting down"), position)
        header = batch.header
        header.batch_index = position
        self._hooks.on_built(batch)
        if header.payload_size > self._limits.max_batch_bytes:
            await self._flush()
            too_large = BatchTooLarge(
                f"batch {position} of dataset {self._dataset!r} has "
                f"{header.payload_size} bytes, over the server's "
                f"max_batch_bytes={self._limits.max_batch_bytes}; ask for a smaller batch_size"
            )
            raise StreamStopped(too_large, position)
        payload = batch.payload
        shared = self._hooks.shared
        if shared is not None and shared.shareable(payload):
            if shared.must_wait(len(payload)):
                await self._flush()  # the client maps (and counts) what it has first
                while shared.must_wait(len(payload)):
                    self._check_drain(position)
                    await shared.wait()
            if shared.has_room(len(payload), self._group):  # else the client holds many: bytes
                self._unsent.append(batch)
                await self._write(self._outbox.add(header, wire.Shared(shared.handle(payload))))
                return
        if self._hooks.compress is not None:
            payload = await self._hooks.compress(header, payload)
        elif batch.file is not None:  # read from the file, not the mapping (wire.FileSlice)
            payload = wire.FileSlice(*batch.file, len(payload), owner=payload[:])
        self._unsent.append(batch)
        await self._write(self._outbox.add(header, payload))

    def _sent(self, header: pb.BatchHeader) -> None:
        """The outbox wrote the message that ends this batch: its memory goes back now."""
        batch = self._unsent.popleft()  # the outbox keeps the order batches came in
        assert batch.header is header, "the outbox sent batches out of order"
        batch.release()
        self._hooks.on_sent(header)

    async def _flush(self) -> None:
        await self._write(self._outbox.flush())

    async def _write(self, messages: Iterable[bytes]) -> None:
        # The outbox calls on_sent once a batch's last message is written.
        for message in messages:
            await self._hooks.write(message)

    async def _await(
        self, future: Future[list[BuiltBatch]], position: int
    ) -> tuple[list[BuiltBatch], BaseException | None]:
        """The task's batches and, if one failed, why; checks the drain deadline meanwhile."""
        self._check_drain(position)
        if not future.done():  # often it is: the stream keeps tasks ahead of the client
            waiter = asyncio.wrap_future(future)
            try:
                while not (await asyncio.wait((waiter,), timeout=POLL_SECONDS))[0]:
                    self._check_drain(position)
            finally:
                # A no-op once done; else (cancelled, draining) the task's result must
                # not call back into a loop that may be closed by then.
                waiter.cancel()
        try:
            return future.result(), None
        except BatchFailed as exc:
            built, exc.built = exc.built, []  # now owned here, released once sent
            return built, exc
        except Exception as exc:  # Unavailable, another BuildError, an executor's bug
            raise StreamStopped(exc, position) from exc

    def _check_drain(self, position: int) -> None:
        if self._hooks.draining():
            raise StreamStopped(Draining("the server is shutting down"), position)

    def _drop_pending(self) -> None:
        """Cancels tasks not started; releases batches built for nobody."""
        while self._pending:
            _, future = self._pending.popleft()
            if future.cancel() or not future.done():
                continue  # dropped, or it lands in the executor's hands (it discards it)
            try:
                release_all(future.result())
            except BatchFailed as exc:
                release_all(exc.built)
            except BaseException:
                pass  # failed: nothing built to give back
