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
Ownership passes to the client when it maps a payload. Each stream has a
release counter: an 8-byte object the server creates, named on the stream's
first handle, into which the client writes how many handles it has mapped.
Once a handle is counted the server drops its own hold on the mapping, and
the payload file, marked given away, is unlinked as soon as the server's
mapping is gone (never recycled: the client may hold its tensors for as long
as it likes, as it would received bytes). The memory then returns when the
client's tensors are garbage-collected. So

* the server runs ahead of the client by at most ``window`` handles (the
  prefetch setting, or a chunk's worth of small batches): the rest waits in
  the worker pool's bounded prefetch, as with bytes;
* a client that dies (SIGKILL) stops counting; its stream is cancelled and
  the server drops every hold it had, so every unacknowledged file is
  unlinked, and the kernel drops the dead client's mappings;
* a server that dies leaves its files named ``batchwire-{pid}-...``: the next
  server start removes the files of dead pids (``PayloadFiles.remove_leftovers``),
  and the client's mappings stay valid until its tensors go;
* a stream that ends (finished, failed, drained) waits a bounded time for the
  client to map what was sent, so that a handle never names a removed file;
  a client that still finds one gone resumes at that batch (``DATA_LOSS``).

Given away, a file misses the pool's page recycling (a fresh file's pages are
allocated by the worker's write): the price of never having to trust a
client to say when its tensors are gone.
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
from collections import deque
from typing import Any

from batchwire.server import _payloads
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger(__name__)

NONCE_BYTES = 16
NONCES_KEPT = 4096
"""Nonces remembered (each client process keeps one per server); the oldest are forgotten."""
MAX_WINDOW = 64
"""Most handles a stream has unacknowledged, however small its batches."""
FINISH_SECONDS = 10.0
"""How long an ending stream waits for its client to map the handles it sent."""
_POLL_FIRST, _POLL_MAX = 0.0002, 0.01

_COUNTER = struct.Struct("<Q")


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

    def offer(self) -> pb.SharedMemoryOfferResponse:
        """Creates an object holding a new nonce; a client that reads it may ask for handles."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        path = self._create(nonce, self._mode)
        with self._lock:
            self._nonces[nonce] = path
            while len(self._nonces) > NONCES_KEPT:
                _, old = self._nonces.popitem(last=False)
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
        # The client writes its count here: group-writable when a group may map.
        path = self._create(bytes(_COUNTER.size), 0o660 if self._gid is not None else 0o600)
        return SharedStream(path, window, window_bytes)

    def close(self) -> None:
        with self._lock:
            paths, self._nonces = list(self._nonces.values()), collections.OrderedDict()
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
    """One stream's handles in flight: held until the client counts them mapped.

    See NOTE [ Who frees a mapped payload ].
    """

    def __init__(self, counter_path: str, window: int, window_bytes: int) -> None:
        self._path = counter_path
        self._window = max(1, min(window, MAX_WINDOW))
        self._window_bytes = window_bytes
        fd = os.open(counter_path, os.O_RDWR)
        try:
            self._counter: mmap.mmap | None = mmap.mmap(fd, _COUNTER.size)
        finally:
            os.close(fd)
        self._held: deque[tuple[Any, int]] = deque()  # (the mapping, payload bytes) per handle
        self._held_bytes = 0
        self._sent = 0
        self._acked = 0
        self._delay = _POLL_FIRST

    def shareable(self, payload: memoryview) -> bool:
        """True if ``payload`` lies in a payload file (else it goes as bytes)."""
        return _payloads.locate(payload) is not None

    def has_room(self, size: int) -> bool:
        """True if a handle to ``size`` more bytes stays within the stream's window."""
        self._take_acks()
        held = len(self._held)
        return (
            held == 0
            or held < self._window
            or (held < MAX_WINDOW and self._held_bytes + size <= self._window_bytes)
        )

    async def wait(self) -> None:
        """Sleeps a little while the client maps (called in a loop until ``has_room``)."""
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, _POLL_MAX)

    def handle(self, payload: memoryview) -> bytes:
        """A serialised ``SharedMemoryPayload`` for ``payload``; holds its mapping until acked."""
        self._delay = _POLL_FIRST
        located = _payloads.locate(payload)
        assert located is not None, "handle() of a payload that is not shareable"
        files, path, offset, mapping = located
        files.give_away(path)
        self._held.append((mapping, len(payload)))
        self._held_bytes += len(payload)
        first = self._sent == 0
        self._sent += 1
        handle = pb.SharedMemoryPayload(path=path, offset=offset)
        if first:
            handle.release_path = self._path
        return handle.SerializeToString()

    async def finish(self, draining: Any = lambda: False) -> None:
        """Waits (a bounded time) until the client mapped every handle sent."""
        deadline = time.monotonic() + FINISH_SECONDS
        while self._take_acks() < self._sent and time.monotonic() < deadline and not draining():
            await self.wait()

    def close(self) -> None:
        """Drops every hold (unacknowledged files are unlinked once unmapped) and the counter."""
        self._held.clear()
        self._held_bytes = 0
        if self._counter is not None:
            with contextlib.suppress(BufferError):
                self._counter.close()
            self._counter = None
        _unlink(self._path)

    def _take_acks(self) -> int:
        if self._counter is None:
            return self._acked
        count = min(_COUNTER.unpack_from(self._counter, 0)[0], self._sent)
        while self._acked < count:  # a client's count only grows; a smaller one changes nothing
            _, size = self._held.popleft()
            self._held_bytes -= size
            self._acked += 1
        return self._acked


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
