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

import contextlib
import logging
import mmap
import os
import struct
import weakref
from dataclasses import dataclass

import grpc

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


class PayloadMapper:
    """One stream's mappings: ``mapper(handle, header)`` is the batch's payload (a view).

    Consecutive batches in one object share a mapping. The stream's release board
    hears of each handle mapped (word 0) and, once a mapping's last tensor is gone,
    of each of its handles released (word 1 + slot), so the server may reuse the
    object (see NOTE [ Who frees a mapped payload ] in ``server/shm_delivery.py``).
    """

    def __init__(self, target: str = "") -> None:
        self._target = target
        self._path = ""
        self._mapping: mmap.mmap | None = None
        self._released: list[tuple[int, int]] = []  # (slot, seq) of the mapping's handles
        self._board: mmap.mmap | None = None
        self._mapped = 0

    def __call__(self, handle: pb.SharedMemoryPayload, header: pb.BatchHeader) -> memoryview:
        if handle.release_path:
            self._board = self._open(handle.release_path, writable=True)
        board = self._board
        if board is None:
            raise StreamCutShort("a shared-memory handle came before the stream's release board")
        if handle.path != self._path or self._mapping is None:
            mapping = self._open(handle.path, writable=False)
            # Runs once no view of the mapping is left (its batches' tensors are gone).
            self._released = []
            weakref.finalize(mapping, _release, board, self._released, os.getpid())
            self._mapping, self._path = mapping, handle.path
        mapping = self._mapping
        end = handle.offset + header.payload_size
        if handle.offset < 0 or end > len(mapping):
            raise StreamCutShort(
                f"batch {header.batch_index}: {handle.path} holds {len(mapping)} bytes, "
                f"not {header.payload_size} at {handle.offset}",
                target=self._target,
            )
        view = memoryview(mapping)[handle.offset : end]
        self._released.append((handle.slot, handle.seq))
        self._mapped += 1
        _WORD.pack_into(board, 0, self._mapped)  # the server may send the next handle
        return view

    def _open(self, path: str, *, writable: bool) -> mmap.mmap:
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)
        except OSError as exc:
            # Removed: the server ended the stream (drain, restart) before this was mapped.
            raise StreamCutShort(
                f"cannot map the server's shared memory {path}: {exc.strerror}",
                target=self._target,
            ) from None
        try:
            size = os.fstat(fd).st_size
            if writable:
                return mmap.mmap(fd, size)  # shared: the server reads it
            # Private (copy-on-write): tensors may be written to, the server never sees it.
            # Not MAP_POPULATE: on a writable private map it copies every page (breaks
            # COW up front); MADV_POPULATE_READ (Linux 5.14) maps the pages for reading.
            mapping = mmap.mmap(
                fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
            with contextlib.suppress(OSError):  # an older kernel: pages fault in on first read
                mapping.madvise(_MADV_POPULATE_READ)
            return mapping
        finally:
            os.close(fd)

    def close(self) -> None:
        """Drops the stream's own references; the batches' views keep their mappings."""
        self._mapping, self._path, self._board = None, "", None


def _release(board: mmap.mmap, handles: list[tuple[int, int]], pid: int) -> None:
    # A finalizer (any thread, maybe in the GC): plain writes into the board. The board
    # stays mapped while a finalizer names it, after its stream ended too (then unread).
    if os.getpid() != pid:
        return  # a forked child's copy (a DataLoader worker): the parent still holds the batch
    with contextlib.suppress(ValueError):  # closed: nothing to tell
        for slot, seq in handles:
            _WORD.pack_into(board, _WORD.size * (1 + slot), seq)
