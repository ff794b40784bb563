"""The pool's payload files in shared memory: named, mapped, and recycled for the next batch.

A worker writes each task's batches into a file in /dev/shm; the gRPC process
maps it (the mapping owns the file while its batches are in use) and reads
each chunk from the file straight into its gRPC message (``wire.FileSlice``). Writing into a fresh
file makes the kernel allocate and zero every page first: 1 MiB took 530 us,
against 100 us into the pages of a file written before (38.5 MB: 1.7 vs 4.4
GB/s), on the benchmark machine. So a file is not removed once its batches
are sent: when its mapping is gone (the last view of its batches released),
its name goes back on a free list and the next task writes over it.

The free list is capped (``RECYCLE_BYTES``), and ``trim`` empties it, which
the pool does when it has been idle for a while: idle servers hold no shared
memory. Names are ``batchwire-{server pid}-{pool id}-{n}``, so the files of a
server that died without cleaning up are found and removed at the next start.

A file handed to a same-host client (``give_away``, see ``shm_delivery``) is
never recycled: the client's tensors map it, so its name is removed as soon as
this process's mapping is gone, and its memory returns once the client's is.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import itertools
import logging
import mmap
import os
import queue
import re
import tempfile
import threading
import weakref

import numpy as np

log = logging.getLogger(__name__)

RECYCLE_BYTES = 256 << 20
"""Most shared memory kept in free files for reuse; beyond it, files are removed."""

_NAME = re.compile(r"batchwire-(\d+)-[0-9a-f]+-\d+")


def default_shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class PayloadFiles:
    """Hands out payload file names, maps finished files, and recycles them once unmapped."""

    def __init__(self, shm_dir: str, owner: object, *, group: str = "") -> None:
        self.shm_dir = shm_dir
        # A configured shm_group may map payloads too (same-host delivery): 0640 of that group.
        self._gid = grp.getgrnam(group).gr_gid if group else None
        self._prefix = f"batchwire-{os.getpid()}-{id(owner):x}-"
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._free: dict[str, int] = {}  # path -> bytes it holds
        # Unmapped files land here first: a finalizer may run inside the cyclic GC, in
        # any thread, even one holding _lock; SimpleQueue.put takes no lock of ours.
        self._unmapped: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._closed = False
        self._given: set[str] = set()  # paths clients map: removed, never recycled, once unmapped

    def take(self) -> str:
        """A path for a worker to write a task's payload to: a free file, else a new name."""
        self._take_unmapped()
        with self._lock:
            if self._free:
                path = next(iter(self._free))
                del self._free[path]
                return path
        return os.path.join(self.shm_dir, f"{self._prefix}{next(self._names)}")

    def open(self, path: str, size: int) -> memoryview:
        """Maps a finished payload read-only; the file is recycled once the mapping is gone.

        The mapping lives as long as any view of it (slices included).
        """
        if size == 0:
            self.discard(path)  # nothing to map (a file may hold a failed batch's bytes)
            return memoryview(b"")
        fd = os.open(path, os.O_RDONLY)
        try:
            if self._gid is not None:
                os.fchown(fd, -1, self._gid)
                os.fchmod(fd, 0o640)
            # Not populated: the stream reads payloads with pread (wire.FileSlice), and a
            # payload that goes to a same-host client as a handle is never read here
            # (populating then unmapping cost ~25 us a batch; see RESULTS.md).
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        weakref.finalize(mapped, self._on_unmapped, path, size)
        _located[mapped] = (self, path)
        return memoryview(mapped)

    def _on_unmapped(self, path: str, size: int) -> None:
        # May run in the cyclic GC, in any thread: set operations and unlink take no lock of ours.
        if path in self._given:
            self._given.discard(path)
            self.discard(path)
        else:
            self._unmapped.put((path, size))

    def give_away(self, path: str) -> None:
        """Marks ``path`` as mapped by a client: removed, not recycled, once unmapped here."""
        self._given.add(path)

    def discard(self, path: str) -> None:
        """Removes a file nobody will map (the batch failed, or its stream ended)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _take_unmapped(self) -> None:
        """Moves unmapped files onto the free list (capped), or removes them."""
        while True:
            try:
                path, size = self._unmapped.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                keep = not self._closed and sum(self._free.values()) + size <= RECYCLE_BYTES
                if keep:
                    self._free[path] = size
            if not keep:
                self.discard(path)

    def trim(self) -> None:
        """Removes every free file (the pool is idle: give the shared memory back)."""
        self._take_unmapped()
        with self._lock:
            free, self._free = list(self._free), {}
        for path in free:
            self.discard(path)

    def close(self) -> None:
        """Removes all of this pool's files; later recycling removes instead of keeping."""
        with self._lock:
            self._closed = True
            self._free.clear()
        for path in glob.glob(os.path.join(self.shm_dir, f"{self._prefix}*")):
            self.discard(path)

    def remove_leftovers(self) -> None:
        """Removes payload files of servers that are gone (SIGKILLed before they could clean up)."""
        removed = 0
        for path in glob.glob(os.path.join(self.shm_dir, "batchwire-*")):
            match = _NAME.fullmatch(os.path.basename(path))
            if match and not _alive(int(match[1])):
                self.discard(path)
                removed += 1
        if removed:
            log.info("removed %d payload file(s) of stopped servers from %s", removed, self.shm_dir)


_located: weakref.WeakKeyDictionary[mmap.mmap, tuple[PayloadFiles, str]] = (
    weakref.WeakKeyDictionary()
)


def locate(view: memoryview) -> tuple[PayloadFiles, str, int, mmap.mmap] | None:
    """Where a payload view lies: (its files, path, offset in the file, the mapping); None when
    it is no view of a payload file (an empty batch, a Ray executor's array)."""
    base = view.obj
    found = _located.get(base) if isinstance(base, mmap.mmap) else None
    if found is None or not len(view):
        return None
    files, path = found
    start = np.frombuffer(base, np.uint8).ctypes.data
    offset = np.frombuffer(view, np.uint8).ctypes.data - start
    return files, path, offset, base


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
