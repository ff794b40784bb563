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
import os
from collections.abc import Sequence

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


class PayloadFile:
    """A payload file in shared memory, written with ``pwrite`` at given offsets.

    Created on the first non-empty write (a batch of empty tensors leaves no
    file); ``close(size)`` sets its length (trailing empty tensors and
    alignment still count).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

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
                written = os.pwrite(self._open(), view, offset)
                view, offset = view[written:], offset + written
            end = offset
        if size is not None:
            self._zeros(end, base + size)

    def _zeros(self, start: int, stop: int) -> None:
        if stop > start:
            os.pwrite(self._open(), bytes(stop - start), start)  # < 64 bytes: alignment

    def _open(self) -> int:
        if self._fd is None:
            # Often a recycled file (see _payloads): its pages are written over, not
            # allocated anew; close() cuts it to this payload's size. A file that is not
            # ours (someone else created the name first) is refused.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            if os.fstat(fd).st_uid != os.geteuid():
                os.close(fd)
                raise PermissionError(f"{self.path} belongs to another user")
            self._fd = fd
        return self._fd

    def close(self, size: int) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, size)
        finally:
            os.close(self._fd)
            self._fd = None


def write_payload_file(
    path: str, tensors: Sequence[torch.Tensor], metas: Sequence[pb.TensorMeta], size: int
) -> None:
    """Creates ``path`` holding each tensor's bytes at its offset (gaps read as zeros)."""
    out = PayloadFile(path)
    try:
        out.write(tensors, metas, 0, size)
    finally:
        out.close(size)
