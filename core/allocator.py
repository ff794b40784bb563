"""Keeps glibc from handing a receiving process's freed message memory back to the kernel.

grpcio receives each message into fresh buffers (its read slices, then the
``bytes`` the client slices tensors from) and frees them once the batch is
gone. With glibc's default, adaptive settings those multi-MiB blocks are
``mmap``ed and ``munmap``ed, or the arena's top is trimmed, one message after
another, so every page of every batch is faulted in and zeroed anew: about a
fifth of a gRPC client's CPU went to page faults, ~330 of them per 3.1 MB
batch and ~6,900 per 38.5 MB one (benchmarks/RESULTS.md, "Allocator"). Fixed
thresholds keep blocks below 32 MiB in the heap and up to ``TRIM_BYTES`` of
freed memory per arena for the next message: the process holds on to a few
messages' worth of memory it would otherwise give back and take again.

It is process-wide, so it is applied once, when the process opens its first
batch stream that receives bytes (not a shared-memory one), and never where
the user chose otherwise: ``BATCHWIRE_MALLOC_TUNING=0`` turns it off, and
glibc settings of one's own (``GLIBC_TUNABLES`` naming ``malloc``, or
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``) win. Other C
libraries (musl) and a malloc preloaded in glibc's place (jemalloc, tcmalloc,
mimalloc in ``LD_PRELOAD``) are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks below this come from the heap (glibc's largest adaptive threshold, fixed)."""
TRIM_BYTES = 64 << 20
"""Freed memory an arena keeps at its top before giving it back."""
ENV = "BATCHWIRE_MALLOC_TUNING"

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3

_PRELOADED_MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")

_lock = threading.Lock()
_decided: bool | None = None  # inherited by a forked child, where the settings are too


def _fresh_lock() -> None:
    global _lock
    _lock = threading.Lock()  # a fork while another thread held it must not hang the child


os.register_at_fork(after_in_child=_fresh_lock)


def _user_chose() -> str | None:
    """Why the allocator is not ours to tune, or None."""
    if os.environ.get(ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return f"{ENV} is off"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if name in os.environ:
            return f"{name} is set"
    if not _glibc():
        return "not glibc"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _PRELOADED_MALLOCS:
        if name in preload:
            return f"{name} is preloaded"
    return None


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):  # musl, macOS
        return False


def thresholds_fixed() -> bool:
    """True once ``keep_message_memory`` fixed them in this process."""
    return bool(_decided)


def keep_message_memory() -> bool:
    """Fixes glibc's mmap and trim thresholds for this process, once; True if they are set."""
    global _decided
    if _decided is not None:
        return _decided
    with _lock:
        if _decided is None:
            _decided = _apply()
        return _decided


def _apply() -> bool:
    reason = _user_chose()
    if reason is not None:
        log.debug("malloc thresholds left as they are: %s", reason)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Both or neither: either one alone also ends glibc's adaptation and leaves the
    # other at its 128 KiB start, worse than the defaults (benchmarks/RESULTS.md).
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    done = done and mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES) == 1
    log.debug("malloc thresholds %s", "fixed" if done else "not accepted")
    return done
