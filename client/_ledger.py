"""Where a dataset's next pass starts, shared with the DataLoader workers that copy it.

See NOTE [ Passes across DataLoader workers ] below.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

import torch

MAX_WORKERS = 256  # DataLoader workers one dataset can count passes for

# NOTE [ Passes across DataLoader workers ]
# Each pass is a new epoch. A DataLoader with workers iterates copies of the
# dataset in its worker processes: fresh copies at every pass unless
# persistent_workers, so an epoch counter kept in the dataset object never
# advances in the main process, and the next pass's fresh workers repeat it.
# The ledger is a tiny int64 tensor in shared memory, made by the process that
# builds the dataset; forked workers inherit it and spawned ones receive it
# through torch's shared-memory pickling, so all of them see one record:
#   base epoch, base sample, base batch: what set_epoch()/load_state_dict() last
#   pinned (batch `base batch` counted from sample `base sample` of the epoch);
#   batch size: what set_batch_size() last set (0: never), which persistent
#   workers take at their next pass;
#   slot[w]: passes worker w has started since. Worker w's pass number p is
#   slot[w]; every worker of one pass reads the same p (each bumps only its own
#   slot), so they stream the same epoch, base + p, without a lock.
# A pass in the main process (no workers) takes p = max(slots) and sets every
# slot to p + 1. The main process's next epoch is base + max(slots).
_BASE_EPOCH, _BASE_SAMPLE, _BASE_BATCH, _BATCH_SIZE, _SLOTS = 0, 1, 2, 3, 4


_ROW = _SLOTS + MAX_WORKERS
_ROWS_PER_BLOCK = 32  # ledgers per shared block: one file descriptor each, not one per dataset


class _Arena:
    """Hands out ledger rows of shared int64 blocks; rows come back when their ledger dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[tuple[torch.Tensor, int]] = []
        self._pid = os.getpid()

    def take(self, owner: object) -> torch.Tensor:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's free rows are not ours
                self._free, self._pid = [], os.getpid()
            if not self._free:
                block = torch.zeros(_ROWS_PER_BLOCK, _ROW, dtype=torch.int64)
                # Without shared memory the workers cannot see earlier passes (and say so).
                with contextlib.suppress(RuntimeError, OSError):
                    block.share_memory_()
                self._free.extend((block, row) for row in reversed(range(_ROWS_PER_BLOCK)))
            block, row = self._free.pop()
        block[row] = 0
        weakref.finalize(owner, self._give_back, self._pid, block, row)
        return block[row]

    def _give_back(self, pid: int, block: torch.Tensor, row: int) -> None:
        with self._lock:
            if pid == self._pid == os.getpid():
                self._free.append((block, row))


_ARENA = _Arena()


class PassLedger:
    """The base position and the passes started since, in shared memory."""

    def __init__(self) -> None:
        self._t = _ARENA.take(self)

    @property
    def shared(self) -> bool:
        """False when the ledger could not be put in shared memory (or was copied by pickle)."""
        return self._t.is_shared()

    def base(self) -> tuple[int, int, int]:
        """(epoch, sample, batch): the next pass starts at batch ``batch`` counted from ``sample``."""
        return int(self._t[_BASE_EPOCH]), int(self._t[_BASE_SAMPLE]), int(self._t[_BASE_BATCH])

    def batch_size(self) -> int:
        """The batch size set_batch_size() last set (0: never)."""
        return int(self._t[_BATCH_SIZE])

    def set_batch_size(self, batch_size: int) -> None:
        self._t[_BATCH_SIZE] = batch_size

    def passes(self) -> int:
        """Passes started since the base was pinned."""
        return int(self._t[_SLOTS:].max())

    def worker_passes(self, worker: int) -> int:
        return int(self._t[_SLOTS + _check(worker)])

    def rebase(self, epoch: int, batch: int, sample: int = 0) -> None:
        """The next pass streams ``epoch`` from ``batch`` (counted from ``sample``); later
        ones the epochs after it."""
        self._t[_BASE_EPOCH], self._t[_BASE_SAMPLE], self._t[_BASE_BATCH] = epoch, sample, batch
        self._t[_SLOTS:] = 0

    def reposition(self, sample: int, batch: int) -> None:
        """The same base position counted another way (a new batch size); passes are kept."""
        self._t[_BASE_SAMPLE], self._t[_BASE_BATCH] = sample, batch

    def start_main_pass(self) -> int:
        """Counts a pass in a process without workers; returns its number since the base."""
        number = self.passes()
        self._t[_SLOTS:] = number + 1
        return number

    def start_worker_pass(self, worker: int) -> int:
        """Counts worker ``worker``'s next pass; returns its number since the base."""
        slot = _SLOTS + _check(worker)
        number = int(self._t[slot])
        self._t[slot] = number + 1
        return number

    def restore_worker(self, worker: int, num_workers: int, epoch: int) -> None:
        """Worker ``worker`` of ``num_workers`` continues ``epoch`` from a state of its own.

        Every worker of the restored loader does this with the same epoch, so
        the shared record ends as a rebase to ``epoch`` (whose first pass each
        worker starts at its own position), whatever order they run in.
        """
        self._t[_BASE_EPOCH], self._t[_BASE_SAMPLE], self._t[_BASE_BATCH] = epoch, 0, 0
        self._t[_SLOTS + _check(worker)] = 0
        self._t[_SLOTS + num_workers :] = 0


def _check(worker: int) -> int:
    if not 0 <= worker < MAX_WORKERS:
        raise ValueError(
            f"a RemoteDataset counts passes for at most {MAX_WORKERS} DataLoader workers, "
            f"but got worker id {worker}"
        )
    return worker
