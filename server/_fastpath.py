"""The worker's half of the fast path: payload bytes into shared memory without page-fault storms.

Measured on the 2-core benchmark machine for one 38.5 MB batch (``big``):
collating into memory freshly mapped from the kernel took 38 ms and writing it
through a fresh ``mmap`` of the payload file 42 ms, almost all of it page
faults on new pages. Keeping freed heap memory for reuse (``mallopt``) brings
the collate to 23 ms, and ``pwrite`` into the file (the kernel allocates the
shared-memory pages in the write itself) brings the write to 4 ms: a worker
spends about a third of the CPU per byte it did. See benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchwire.v1 import batchwire_pb2 as pb

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30

IDLE_SECONDS = 1.0
"""A worker with no task for this long returns its kept memory (``release_freed_memory``)."""


def reuse_freed_memory() -> None:
    """Makes glibc's malloc keep large freed blocks instead of returning them to the kernel.

    A worker allocates and frees a batch-sized block per batch; served from
    fresh ``mmap`` each time, every page faults in again. The cost is a worker's
    resident memory staying at its high-water mark (a few batches) while it is
    busy; an idle worker gives it back (``release_freed_memory``). A no-op where
    malloc is not glibc's.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BYTES)


def release_freed_memory() -> None:
    """Returns free heap memory to the kernel (``malloc_trim``), for when a worker goes idle."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@dataclass
class _Open:
    """A payload file open for writing: its fd, its length as set here, its writable mapping."""

    fd: int
    size: int
    mapped: memoryview | None = None  # its first len(mapped) bytes (may outlast a truncation)


class KeptFiles:
    """A worker's payload files, kept open and mapped between its tasks.

    The pool recycles a few payload files (``_payloads``); mapping one for
    each task cost more than the copy it saves (3.3 MB: map, populate and unmap
    250 us, ``pwrite`` 260 us, a copy into a kept mapping 70 us). So a worker
    keeps its files' mappings. Memory is never held for long: a file the pool
    removed (``st_nlink`` 0) is let go at the worker's next task (``sweep``),
    and an idle worker lets all go (``release``). At most ``limit`` are kept.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._files: OrderedDict[str, _Open] = OrderedDict()

    def take(self, path: str) -> _Open | None:
        """The kept file of ``path``; None if there is none, or it has been removed since."""
        file = self._files.pop(path, None)
        if file is None:
            return None
        stat = os.fstat(file.fd)
        if stat.st_nlink == 0:
            _close(file)  # the name may be a new file by now
            return None
        # Another worker may have written it since, and cut it shorter: touching the
        # mapping past its end would be a SIGBUS. ``region`` grows it again first.
        file.size = stat.st_size
        return file

    def keep(self, path: str, file: _Open) -> None:
        self._files[path] = file
        while len(self._files) > self.limit:
            _close(self._files.popitem(last=False)[1])

    def sweep(self) -> None:
        """Lets go of the files that the pool has removed since."""
        for path, file in list(self._files.items()):
            if os.fstat(file.fd).st_nlink == 0:
                _close(self._files.pop(path))

    def release(self) -> None:
        while self._files:
            _close(self._files.popitem()[1])


def _close(file: _Open) -> None:
    file.mapped = None  # unmapped once no view of it is left (normally: now)
    os.close(file.fd)


class PayloadFile:
    """A payload file in shared memory, written at given offsets: ``pwrite``, or in place.

    Created on the first non-empty write (a batch of empty tensors leaves no
    file); ``close(size)`` sets its length (trailing empty tensors and
    alignment still count). With ``kept``, the file stays open and mapped for
    the worker's next task on it (``KeptFiles``).
    """

    def __init__(self, path: str, kept: KeptFiles | None = None) -> None:
        self.path = path
        self._kept = kept
        self._file: _Open | None = None

    def region(self, start: int, stop: int, expect: int = 0) -> memoryview:
        """Writable memory of bytes ``[start, stop)`` of the file; it grows to hold them.

        For writing a batch in place (``direct_collate``): the bytes go straight
        into the file's shared-memory pages, no ``pwrite`` copy. A file shorter
        than ``stop`` grows to ``max(stop, expect)`` (``expect``: where the
        task's later batches will likely end, so that one mapping serves them);
        ``close(size)`` cuts it. Mappings are populated: one call fills their page
        tables instead of a fault per page. Contents are undefined (a recycled
        file holds its last payload): callers write every byte, gaps included.
        """
        file = self._open()
        if stop > file.size:
            length = -(-max(stop, expect) // mmap.PAGESIZE) * mmap.PAGESIZE
            # Allocated now, not at the first write through the mapping: a full
            # /dev/shm is an OSError (ENOSPC) that fails the task, not a SIGBUS.
            os.posix_fallocate(file.fd, file.size, length - file.size)
            file.size, file.mapped = length, None
        if file.mapped is None or stop > len(file.mapped):
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            file.mapped = None  # the old mapping goes once no view of it is left
            file.mapped = memoryview(mmap.mmap(file.fd, file.size, flags=flags, prot=prot))
        return file.mapped[start:stop]

    def write(
        self,
        tensors: Sequence[torch.Tensor],
        metas: Sequence[pb.TensorMeta],
        base: int = 0,
        size: int | None = None,
    ) -> None:
        """Writes each tensor's bytes at ``base + meta.offset``, and zeros in the gaps.

        ``size`` is the payload's size (alignment after the last tensor counts).
        A recycled file still holds its last payload: gaps are written, not skipped,
        so no byte of another batch goes out with this one.
        """
        end = base
        for tensor, meta in zip(tensors, metas, strict=True):
            if not meta.nbytes:
                continue
            self._zeros(end, base + meta.offset)
            raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            view, offset = memoryview(raw), base + meta.offset
            while len(view):
                written = os.pwrite(self._open().fd, view, offset)
                view, offset = view[written:], offset + written
            end = offset
        if size is not None:
            self._zeros(end, base + size)
        if self._file is not None:
            self._file.size = max(self._file.size, end, base + (size or 0))

    def _zeros(self, start: int, stop: int) -> None:
        if stop > start:
            os.pwrite(self._open().fd, bytes(stop - start), start)  # < 64 bytes: alignment

    def _open(self) -> _Open:
        if self._file is None:
            self._file = self._kept.take(self.path) if self._kept is not None else None
        if self._file is None:
            # Often a recycled file (see _payloads): its pages are written over, not
            # allocated anew; close() cuts it to this payload's size. A file that is not
            # ours (someone else created the name first) is refused. Read and write:
            # a writable shared mapping (``region``) needs both.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            stat = os.fstat(fd)
            if stat.st_uid != os.geteuid():
                os.close(fd)
                raise PermissionError(f"{self.path} belongs to another user")
            self._file = _Open(fd, stat.st_size)
        return self._file

    def close(self, size: int) -> None:
        """Sets the file's length to ``size``; a kept file may keep a short zeroed tail.

        A file cut shorter must allocate and zero fresh pages when it grows again
        (the next task has a batch more; the pool's tasks vary from 1 to 16 small
        batches with the build time). So for a kept file a tail of up to half of
        it is zeroed instead, in its mapping: a free file holds at most twice its
        payload, and no byte of an older payload stays readable either way.
        """
        file, self._file = self._file, None
        if file is None:
            return
        try:
            tail = file.size - size
            mapped = file.mapped is not None and len(file.mapped) >= file.size
            if 0 < tail <= file.size // 2 and self._kept is not None and mapped:
                assert file.mapped is not None
                file.mapped[size : file.size] = bytes(tail)
            else:
                os.ftruncate(file.fd, size)
                file.size = size
        except BaseException:
            _close(file)
            raise
        if self._kept is not None:
            self._kept.keep(self.path, file)
        else:
            _close(file)


def write_payload_file(
    path: str, tensors: Sequence[torch.Tensor], metas: Sequence[pb.TensorMeta], size: int
) -> None:
    """Creates ``path`` holding each tensor's bytes at its offset (gaps read as zeros)."""
    out = PayloadFile(path)
    try:
        out.write(tensors, metas, 0, size)
    finally:
        out.close(size)
