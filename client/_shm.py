"""The client's half of same-host delivery: prove it can map the server's memory, then map payloads.

``negotiate`` asks the server for an offer (``SharedMemoryOffer``), opens the
object it names and reads the nonce in it: that proves this process shares
the server's host, kernel, IPC namespace (/dev/shm) and permissions. Streams
then send the nonce (``StreamBatchesRequest.shared_memory_nonce``), and their
batches may arrive as handles, which ``PayloadMapper`` maps: tensors are views
of the pages the server's worker wrote (copy-on-write, so writing to them
never reaches the server). See NOTE [ Who frees a mapped payload ] in
``server/shm_delivery.py`` for who frees what.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import mmap
import os
import struct
import weakref
from dataclasses import dataclass, field

import grpc
import numpy as np

from batchwire.client._errors import BatchwireError, ServerError
from batchwire.client._retry import StreamCutShort
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger("batchwire.client")

TRANSPORT_ENV = "BATCHWIRE_TRANSPORT"
TRANSPORTS = ("auto", "shm", "grpc")
SHM, GRPC = "shm", "grpc"

_WORD = struct.Struct("<Q")
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class TransportError(BatchwireError):
    """``transport="shm"`` was asked for, but this client cannot map the server's memory."""


def check_transport(transport: str) -> str:
    """The transport asked for: ``transport``, or ``BATCHWIRE_TRANSPORT`` for ``"auto"``."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport should be one of {TRANSPORTS}, but got {transport!r}")
    if transport == "auto":
        transport = os.environ.get(TRANSPORT_ENV, "").strip().lower() or "auto"
        if transport not in TRANSPORTS:
            raise ValueError(
                f"{TRANSPORT_ENV} should be one of {TRANSPORTS}, but got {transport!r}"
            )
    return transport


@dataclass(frozen=True)
class Decision:
    """The path a client's streams take, and why."""

    transport: str  # SHM or GRPC
    reason: str
    nonce: bytes = b""


def negotiate(
    channel: grpc.Channel, target: str, wanted: str, timeout: float, *, wait_for_ready: bool = True
) -> Decision:
    """Proves shared memory usable (``wanted`` "auto" or "shm") or says why not.

    Raises ``TransportError`` when ``wanted`` is "shm" and it is not usable.
    """
    if wanted == GRPC:
        decision = Decision(GRPC, "the client opted out (transport='grpc')")
    else:
        decision = _prove(channel, target, timeout, wait_for_ready)
    if wanted == SHM and decision.transport != SHM:
        raise TransportError(f"transport='shm' asked, but {decision.reason}")
    return decision


def _prove(channel: grpc.Channel, target: str, timeout: float, wait_for_ready: bool) -> Decision:
    call = channel.unary_unary(
        "/batchwire.v1.BatchService/SharedMemoryOffer",
        request_serializer=pb.SharedMemoryOfferRequest.SerializeToString,
        response_deserializer=pb.SharedMemoryOfferResponse.FromString,
    )
    try:
        offer = call(pb.SharedMemoryOfferRequest(), timeout=timeout, wait_for_ready=wait_for_ready)
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION):
            return Decision(GRPC, f"the server at {target} offers no shared memory")
        raise ServerError.from_rpc(error, target) from None
    try:
        fd = os.open(offer.path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return Decision(
            GRPC,
            f"the server's shared memory {offer.path} is not visible here (another host, "
            "container or IPC namespace: share /dev/shm with the server to map batches)",
        )
    except PermissionError:
        return Decision(
            GRPC,
            f"this process (uid {os.geteuid()}) may not open the server's shared memory "
            f"{offer.path} (owned by uid {_owner(offer.path)}; run as the server's user "
            "or in its shm_group)",
        )
    except OSError as exc:
        return Decision(GRPC, f"cannot open the server's shared memory {offer.path}: {exc}")
    try:
        nonce = os.read(fd, offer.size)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):  # read: not needed any more (else the server removes it)
        os.unlink(offer.path)
    if len(nonce) != offer.size or not nonce:
        return Decision(GRPC, f"the server's offer {offer.path} held no nonce")
    return Decision(SHM, f"this process opened the server's shared memory {offer.path}", nonce)


def _owner(path: str) -> str:
    try:
        return str(os.stat(path).st_uid)
    except OSError:
        return "?"


MAPPINGS_KEPT = 16
KEPT_BYTES = 512 << 20
"""Mappings of the server's files a stream keeps for their next batches, and their bytes at
most (least recently used go first): a file the server has since let go of (idle, or given
away) stays allocated while a stream keeps a mapping of it."""

_PAGE = mmap.PAGESIZE
_PRESENT, _SWAPPED, _FILE_PAGE = 1 << 63, 1 << 62, 1 << 61  # /proc/self/pagemap entry bits


@dataclass
class _Mapping:
    """A private (copy-on-write) mapping of one of the server's payload files."""

    memory: mmap.mmap
    inode: tuple[int, int]  # (st_dev, st_ino): a path the server reused names another file
    address: int
    mapped: int = 0  # batches handed out of it
    released: list[int] = field(default_factory=list)  # one entry per batch let go (finalizers)

    @property
    def live(self) -> bool:
        return self.mapped > len(self.released)


class PayloadMapper:
    """One stream's mappings: ``mapper(handle, header)`` is the batch's payload (a view).

    The server recycles a handful of payload files for a stream's batches, so
    the stream keeps its mappings of them (``MAPPINGS_KEPT``, ``KEPT_BYTES``):
    mapping a file and filling in its page tables, then tearing them down, cost
    more than half of the client's CPU per cifar-sized batch. A kept mapping is
    used again only where it shows the file's current bytes: pages a training
    loop wrote to are private copies of old bytes, so once the server may have
    written over the file, a mapping with any such page (``/proc/self/pagemap``)
    is replaced by a new one. Each batch tells the stream's release board
    that it was mapped (word 0) and, once its last tensor is gone, that it was
    released (word 1 + slot), so the server may reuse the file (see NOTE [ Who
    frees a mapped payload ] in ``server/shm_delivery.py``).
    """

    def __init__(self, target: str = "") -> None:
        self._target = target
        self._kept: collections.OrderedDict[str, _Mapping] = collections.OrderedDict()
        self._kept_bytes = 0
        self._board: mmap.mmap | None = None
        self._mapped = 0
        self._pagemap = _open_pagemap()
        self._pagemap_checked = False

    def __call__(self, handle: pb.SharedMemoryPayload, header: pb.BatchHeader) -> memoryview:
        if handle.release_path:
            self._board = self._open(handle.release_path, writable=True)[0]
        board = self._board
        if board is None:
            raise StreamCutShort("a shared-memory handle came before the stream's release board")
        end = handle.offset + header.payload_size
        if handle.offset < 0:
            raise StreamCutShort(
                f"batch {header.batch_index}: a negative offset in {handle.path}",
                target=self._target,
            )
        mapping = self._mapping(handle.path, handle.offset, end, header.batch_index)
        mapping.mapped += 1
        batch = np.frombuffer(mapping.memory, np.uint8, header.payload_size, handle.offset)
        # Runs once no tensor of this batch is left (they hold ``batch`` through the view).
        weakref.finalize(
            batch, _release, board, handle.slot, handle.seq, mapping.released, os.getpid()
        )
        self._mapped += 1
        _WORD.pack_into(board, 0, self._mapped)  # the server may send the next handle
        return memoryview(batch)

    def _mapping(self, path: str, start: int, end: int, batch_index: int) -> _Mapping:
        """A mapping of ``path`` whose bytes ``[start, end)`` are the file's current ones."""
        kept = self._kept.pop(path, None)
        if kept is not None:
            if end <= len(kept.memory) and self._current(kept, path, start, end):
                self._kept[path] = kept  # the most recently used, last
                return kept
            self._kept_bytes -= len(kept.memory)
        memory, info = self._open(path, writable=False)
        if end > len(memory):
            raise StreamCutShort(
                f"batch {batch_index}: {path} holds {len(memory)} bytes, not {end - start} "
                f"at {start}",
                target=self._target,
            )
        address = np.frombuffer(memory, np.uint8, 1).ctypes.data
        mapping = _Mapping(memory, (info.st_dev, info.st_ino), address)
        if not self._pagemap_checked:
            # A page just mapped and filled in is present and the file's: a /proc that
            # says otherwise (a sandbox's) cannot tell copied pages either.
            self._pagemap_checked = True
            flags = self._page_flags(mapping, 0, 1)
            if flags is None or not (flags[0] & _PRESENT and flags[0] & _FILE_PAGE):
                self._close_pagemap()
        self._kept[path] = mapping
        self._kept_bytes += len(memory)
        while len(self._kept) > 1 and (
            len(self._kept) > MAPPINGS_KEPT or self._kept_bytes > KEPT_BYTES
        ):
            self._kept_bytes -= len(self._kept.popitem(last=False)[1].memory)
        return mapping

    def _current(self, kept: _Mapping, path: str, start: int, end: int) -> bool:
        """True if ``kept`` shows the file's current bytes at ``[start, end)``.

        While a batch of it is held, the server cannot have written over the file
        since the mapping was made or last checked here. Else the file may hold a
        new task, so no page of the whole mapping may be a private copy of older
        bytes (a loop's write in place to any earlier batch of it, even swapped out).
        """
        if kept.live:
            return True  # and the path names its file still: the server holds it for us
        try:
            info = os.stat(path)
        except OSError:
            return False  # removed: opening it again says so
        if (info.st_dev, info.st_ino) != kept.inode:
            return False
        pages = self._page_flags(kept, 0, len(kept.memory))
        if pages is None:
            return False  # cannot tell which pages a loop wrote to
        present = (pages & np.uint64(_PRESENT)) != 0
        copied = present & ((pages & np.uint64(_FILE_PAGE)) == 0)
        if copied.any() or ((pages & np.uint64(_SWAPPED)) != 0).any():
            return False  # a private copy of old bytes
        first = start // _PAGE
        region = present[first : max(first, (end - 1) // _PAGE + 1)]
        if not region.all():  # never read since the file grew, or evicted: fill them in
            with contextlib.suppress(OSError, ValueError):
                kept.memory.madvise(_MADV_POPULATE_READ, first * _PAGE, len(region) * _PAGE)
        return True

    def _page_flags(self, mapping: _Mapping, start: int, end: int) -> np.ndarray | None:
        """The pagemap entries of the pages under ``mapping``'s bytes ``[start, end)``."""
        if self._pagemap is None:
            return None
        first = (mapping.address + start) // _PAGE
        last = (mapping.address + end - 1) // _PAGE
        try:
            raw = os.pread(self._pagemap, 8 * (last - first + 1), 8 * first)
        except OSError:
            return None
        return np.frombuffer(raw, np.uint64) if len(raw) == 8 * (last - first + 1) else None

    def _open(self, path: str, *, writable: bool) -> tuple[mmap.mmap, os.stat_result]:
        """A mapping of ``path`` and what the file mapped is (whatever the name names later)."""
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)
        except OSError as exc:
            # Removed: the server ended the stream (drain, restart) before this was mapped.
            raise StreamCutShort(
                f"cannot map the server's shared memory {path}: {exc.strerror}",
                target=self._target,
            ) from None
        try:
            info = os.fstat(fd)
            if writable:
                return mmap.mmap(fd, info.st_size), info  # shared: the server reads it
            # Private (copy-on-write): tensors may be written to, the server never sees it.
            # Not MAP_POPULATE: on a writable private map it copies every page (breaks
            # COW up front); MADV_POPULATE_READ (Linux 5.14) maps the pages for reading.
            mapping = mmap.mmap(
                fd, info.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
            with contextlib.suppress(OSError):  # an older kernel: pages fault in on first read
                mapping.madvise(_MADV_POPULATE_READ)
            return mapping, info
        finally:
            os.close(fd)

    def close(self) -> None:
        """Drops the stream's own references; the batches' views keep their mappings."""
        self._kept.clear()
        self._kept_bytes = 0
        self._board = None
        self._close_pagemap()

    def _close_pagemap(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None


def _open_pagemap() -> int | None:
    """This process's page table flags (whether a page is the file's or a private copy),
    or None where /proc does not give them: kept mappings are then used again only
    while one of their batches is held."""
    try:
        return os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None


def _release(board: mmap.mmap, slot: int, seq: int, released: list[int], pid: int) -> None:
    # A finalizer (any thread, maybe in the GC): plain writes into the board, and a list
    # append (atomic). The board stays mapped while a finalizer names it, after its
    # stream ended too (then unread).
    if os.getpid() != pid:
        return  # a forked child's copy (a DataLoader worker): the parent still holds the batch
    released.append(seq)
    with contextlib.suppress(ValueError):  # closed: nothing to tell
        _WORD.pack_into(board, _WORD.size * (1 + slot), seq)
