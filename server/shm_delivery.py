"""Same-host delivery: a stream sends handles to payloads in shared memory instead of their bytes.

The worker pool already builds every batch into a payload file in /dev/shm
(``_payloads``). A trainer on the same host, in the same IPC namespace and
allowed to open the server's files, can map that file: its tensors are views
of the pages the worker wrote, with no copy through gRPC.

The decision is proven, not guessed: ``SharedMemoryOffer`` creates a small
object holding a random nonce (mode 0600, or 0640 with ``shm_group``) and
names it; a client that opened it returns the nonce in its request
(``StreamBatchesRequest.shared_memory_nonce``). Only a stream whose request
carries a nonce this server made gets handles; everyone else gets bytes.

NOTE [ Who frees a mapped payload ]
Each stream has a release board: a small object the server creates, named on
the stream's first handle, of little-endian uint64 words the client writes.
Word 0 counts the handles it has mapped; word 1 + slot receives a handle's
``seq`` once the client's mapping of it is gone (no tensor left: a finalizer
on the mapping writes it). So

* the server runs ahead of what the client has mapped by at most ``window``
  handles (the prefetch setting, or a chunk's worth of small batches), and
  waits beyond that, as gRPC flow control makes bytes wait;
* a released file goes back to the pool's free list and its pages are
  written over by a later batch (a fresh file's pages cost the worker 5x the
  write, see ``_payloads``); the server's hold on it ends there;
* a client holding many mapped batches (a loop that keeps them all) uses up
  the stream's slots (``2 * window``): the next batches go as bytes, so it
  never pins more of the server's memory than that;
* when the stream ends (finished, failed, drained, or the client died or
  went away) every file still unreleased is given away: never recycled, its
  name unlinked once the server's mapping is gone, so its memory returns when
  the client's mappings go (at once for a dead client);
* a server that dies leaves its files named ``batchwire-{pid}-...``: the next
  server start removes the files of dead pids (``PayloadFiles.remove_leftovers``),
  and the client's mappings stay valid until its tensors go;
* an ending stream first waits until the client mapped every handle
  sent, so that a handle never names a removed file; a client that still
  finds one gone resumes at that batch (``DATA_LOSS``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import grp
import logging
import mmap
import os
import secrets
import struct
import threading
import time
from typing import Any

from batchwire.server import _payloads
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger(__name__)

NONCE_BYTES = 16
NONCES_KEPT = 4096
"""Nonces remembered (each client process keeps one per server); the oldest are forgotten."""
MAX_WINDOW = 64
"""Slots of a stream's release board: most handles a client holds, however small its batches."""
OFFER_SECONDS = 30.0
"""An offer's object is removed by the next offer after this long, if its client did not."""
_POLL_FIRST, _POLL_MAX = 0.0001, 0.01
"""Polling the release board: quick while a fast client maps, rarely while a slow one computes."""

_WORD = struct.Struct("<Q")


class SharedMemory:
    """The server's side of shared-memory delivery: offers, and the streams that use one."""

    def __init__(self, shm_dir: str, group: str = "") -> None:
        self.shm_dir = shm_dir or _payloads.default_shm_dir()
        self._gid = grp.getgrnam(group).gr_gid if group else None
        self._mode = 0o640 if self._gid is not None else 0o600
        self._prefix = f"batchwire-{os.getpid()}-{secrets.token_hex(4)}-"
        self._names = iter(range(1 << 62))
        self._lock = threading.Lock()
        self._nonces: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._offered: collections.deque[tuple[float, str]] = collections.deque()  # (when, path)

    def offer(self) -> pb.SharedMemoryOfferResponse:
        """Creates an object holding a new nonce; a client that reads it may ask for handles."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        path = self._create(nonce, self._mode)
        now = time.monotonic()
        with self._lock:
            self._nonces[nonce] = path
            while len(self._nonces) > NONCES_KEPT:
                self._nonces.popitem(last=False)
            self._offered.append((now, path))
            stale = []
            while self._offered and self._offered[0][0] < now - OFFER_SECONDS:
                stale.append(self._offered.popleft()[1])
        for old in stale:  # never read (the client went away), or read by one that may not unlink
            _unlink(old)
        return pb.SharedMemoryOfferResponse(path=path, size=NONCE_BYTES)

    def accepts(self, nonce: bytes) -> bool:
        """True if ``nonce`` is one this server offered (the client proved it can map ours)."""
        if not nonce:
            return False
        with self._lock:
            path = self._nonces.get(nonce)
        if path is None:
            return False
        _unlink(path)  # read: the offer's object is not needed any more (the nonce stays valid)
        return True

    def stream(self, window: int, window_bytes: int) -> SharedStream:
        """A stream's handles, at most ``window`` of them (or ``window_bytes``) unacknowledged."""
        # The client writes the board: group-writable when a group may map.
        path = self._create(bytes(board_bytes()), 0o660 if self._gid is not None else 0o600)
        return SharedStream(path, window, window_bytes)

    def close(self) -> None:
        with self._lock:
            paths = [path for _, path in self._offered]
            self._nonces.clear()
            self._offered.clear()
        for path in paths:
            _unlink(path)

    def _create(self, content: bytes, mode: int) -> str:
        with self._lock:
            path = os.path.join(self.shm_dir, f"{self._prefix}{next(self._names)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            if self._gid is not None:
                os.fchown(fd, -1, self._gid)
            os.fchmod(fd, mode)  # not narrowed by the umask, nor wider than asked
            os.write(fd, content)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        return path


class SharedStream:
    """One stream's handles: waits while the client has not mapped them, holds each
    payload until the client released it. See NOTE [ Who frees a mapped payload ]."""

    def __init__(self, board_path: str, window: int, window_bytes: int) -> None:
        self._path = board_path
        self._window = max(1, min(window, MAX_WINDOW))
        self._window_bytes = window_bytes
        fd = os.open(board_path, os.O_RDWR)
        try:
            self._board: mmap.mmap | None = mmap.mmap(fd, board_bytes())
        finally:
            os.close(fd)
        self._free_slots = list(range(MAX_WINDOW - 1, -1, -1))
        # slot -> (seq, the payload's files, path, the server's mapping of it, bytes)
        self._held: dict[int, tuple[int, Any, str, Any, int]] = {}
        self._held_bytes = 0
        self._sent = 0
        self._mapped = 0
        self._delay = _POLL_FIRST
        self._located: tuple[Any, Any] = (None, None)

    def shareable(self, payload: memoryview) -> bool:
        """True if ``payload`` lies in a payload file (else it goes as bytes)."""
        self._located = (payload, _payloads.locate(payload))  # for handle(), next
        return self._located[1] is not None

    def must_wait(self, size: int) -> bool:
        """True while the client has ``window`` handles (or bytes) sent but not yet mapped."""
        self._read_board()
        limit = max(self._window, min(MAX_WINDOW, self._window_bytes // max(size, 1)))
        return self._sent - self._mapped >= limit

    def has_room(self, size: int, grouped: int = 1) -> bool:
        """True if the client may hold ``size`` more bytes mapped (else: send bytes).

        ``grouped``: batches per payload file (a worker task's). The client
        releases a file's batches together, once it is done with the last, so
        the stream holds that many more while the client works through a file.
        """
        if self._room(size, grouped):
            return True
        self._read_board(full=True)  # a batch kept long (say, the first) blocks no later ones
        return self._room(size, grouped)

    def _room(self, size: int, grouped: int) -> bool:
        if not self._free_slots:
            return False
        if len(self._held) < 2 * self._window + grouped - 1:
            return True
        return self._held_bytes + size <= 2 * self._window_bytes + (grouped - 1) * size

    async def wait(self) -> None:
        """Sleeps a little while the client maps (called in a loop until not ``must_wait``)."""
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, _POLL_MAX)

    def handle(self, payload: memoryview) -> bytes:
        """A serialised ``SharedMemoryPayload`` for ``payload``; holds it until released."""
        self._delay = _POLL_FIRST
        last, located = self._located
        self._located = (None, None)
        if last is not payload:
            located = _payloads.locate(payload)
        assert located is not None, "handle() of a payload that is not shareable"
        files, path, offset, mapping = located
        self._sent += 1
        slot = self._free_slots.pop()
        self._held[slot] = (self._sent, files, path, mapping, len(payload))
        self._held_bytes += len(payload)
        handle = pb.SharedMemoryPayload(path=path, offset=offset, slot=slot, seq=self._sent)
        if self._sent == 1:
            handle.release_path = self._path
        return handle.SerializeToString()

    async def finish(self, draining: Any = lambda: False) -> None:
        """Waits until the client mapped every handle sent (or the drain deadline passed).

        As unbounded as a stream held up by gRPC flow control: a client that went
        away cancels the call, which ends this wait.
        """
        while not draining():
            self._read_board()
            if self._mapped >= self._sent:
                return
            await self.wait()

    def close(self) -> None:
        """Gives away what the client still holds (never recycled) and removes the board."""
        self._read_board()
        for _, files, path, _, _ in self._held.values():
            files.give_away(path)
        self._held.clear()
        self._held_bytes = 0
        if self._board is not None:
            with contextlib.suppress(BufferError):
                self._board.close()
            self._board = None
        _unlink(self._path)

    def _read_board(self, *, full: bool = False) -> None:
        """Reads what the client mapped and released (``full``: every slot, not just the oldest)."""
        board = self._board
        if board is None:
            return
        self._mapped = min(_WORD.unpack_from(board, 0)[0], self._sent)
        # Oldest first, up to the first still held: clients release mostly in order, and a
        # later one released early is found once those before it are (a scan per batch
        # over every slot would cost more than the batch).
        released = []
        for slot, held in self._held.items():
            if _released(board, slot, held[0]):
                released.append(slot)
            elif not full:
                break
        for slot in released:
            size = self._held.pop(slot)[4]  # the server's hold ends: recycled once unmapped
            self._held_bytes -= size
            self._free_slots.append(slot)


def board_bytes() -> int:
    """A release board: the mapped count, then one word per slot."""
    return _WORD.size * (1 + MAX_WINDOW)


def _released(board: mmap.mmap, slot: int, seq: int) -> bool:
    return _WORD.unpack_from(board, _WORD.size * (1 + slot))[0] == seq


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
