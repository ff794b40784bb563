"""Turns a stream's built batches into gRPC messages: big ones in chunks, small ones packed.

A message costs the sync gRPC server a hand-off to its completion-queue thread
and a wait for the send to complete, whatever its size, and the client a
message's worth of bookkeeping: at 200 KB a batch that fixed cost is as large
as the bytes' (benchmarks/RESULTS.md, mnist). Clients that accept it
(``max_batches_per_message``) get small batches that are ready together in
one message, up to the chunk size. Nothing is held back waiting for a later
batch: the stream flushes before it waits on a worker (batches already
built join the message).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from batchwire import wire
from batchwire.v1 import batchwire_pb2 as pb

_FRAMING_BYTES = 16  # tags and lengths around a packed batch, at most


class Outbox:
    """Frames batches for one stream; ``on_sent(header)`` runs once a batch's message is out."""

    def __init__(
        self, chunk_bytes: int, max_per_message: int, on_sent: Callable[[pb.BatchHeader], None]
    ) -> None:
        self._chunk_bytes = chunk_bytes
        self._max_per_message = max(1, max_per_message)
        self._on_sent = on_sent
        self._pack: list[tuple[pb.BatchHeader, Any]] = []
        self._pack_bytes = 0

    def add(self, header: pb.BatchHeader, payload: Any) -> Iterator[bytes]:
        """Yields the messages that are complete once this batch is added."""
        size = len(payload) + header.ByteSize() + _FRAMING_BYTES
        if self._max_per_message == 1 or size > self._chunk_bytes:
            yield from self.flush()
            yield from wire.frames(header, payload, self._chunk_bytes)
            self._on_sent(header)
            return
        if len(self._pack) >= self._max_per_message or self._pack_bytes + size > self._chunk_bytes:
            yield from self.flush()
        self._pack.append((header, payload))
        self._pack_bytes += size

    def flush(self) -> Iterator[bytes]:
        """Yields the batches held for packing, as one message."""
        if not self._pack:
            return
        pack, self._pack, self._pack_bytes = self._pack, [], 0
        yield wire.packed_frame(pack)
        for header, _ in pack:
            self._on_sent(header)
