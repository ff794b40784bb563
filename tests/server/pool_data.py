"""Datasets for the pool hardening tests, imported by the server's workers (``python`` source)."""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset


class CountedSlowRange(Dataset):
    """Item i is ``tensor([i])`` after ``delay`` seconds; each load appends a line to ``counter``.

    The counter file counts the items the workers really built, whatever the
    streams received.
    """

    def __init__(self, length: int, delay: float, counter: str) -> None:
        self.length = length
        self.delay = delay
        self.counter = counter

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.delay)
        fd = os.open(self.counter, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{index}\n".encode())
        finally:
            os.close(fd)
        return torch.tensor([index])


def counted_slow_range(length: int, delay: float, counter: str) -> CountedSlowRange:
    return CountedSlowRange(length, delay, counter)


class FileSizeLimited(Dataset):
    """Item i is 4096 float32s; in a worker, files stop growing at 4 KiB (writes fail with EFBIG).

    Stands in for a full /dev/shm: the worker writes part of the payload, then
    reports an error. The limit is set only in worker processes (not in the
    gRPC process, which also opens the dataset).
    """

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        import multiprocessing
        import resource
        import signal

        if multiprocessing.parent_process() is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        return torch.full((4096,), float(index))


def file_size_limited(length: int) -> FileSizeLimited:
    return FileSizeLimited(length)


class HangsAt(Dataset):
    """Item i is ``tensor([i])``; item ``hang`` never returns (a stuck read, a deadlocked decoder)."""

    def __init__(self, length: int, hang: int) -> None:
        self.length = length
        self.hang = hang

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        while index == self.hang:
            time.sleep(3600)
        return torch.tensor([index])


def hangs_at(length: int, hang: int) -> HangsAt:
    return HangsAt(length, hang)
