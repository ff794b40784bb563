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


class NestedAt(Dataset):
    """Item i is ``tensor([i])``; item ``bad`` is that tensor inside ``depth`` nested lists.

    ``depth=0``: item ``bad`` is a string instead (it cannot travel either).
    """

    def __init__(self, length: int, bad: int, depth: int) -> None:
        self.length = length
        self.bad = bad
        self.depth = depth

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> object:
        item: object = torch.tensor([index])
        if index == self.bad and not self.depth:
            return f"item {index}"
        if index == self.bad:
            for _ in range(self.depth):
                item = [item]
        return item


def nested_at(length: int, bad: int, depth: int) -> NestedAt:
    return NestedAt(length, bad, depth)


class ExitsAt(Dataset):
    """Item i is ``tensor([i])``; item ``bad`` calls ``sys.exit`` (in a worker: not at start-up).

    ``hard``: ``os._exit`` instead, which nothing can catch (as a segfault).
    """

    def __init__(self, length: int, bad: int, hard: bool = False) -> None:
        self.length = length
        self.bad = bad
        self.hard = hard

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        import multiprocessing
        import sys

        if index == self.bad and multiprocessing.parent_process() is not None:
            if self.hard:
                os._exit(3)
            sys.exit(f"item {index} gave up")
        return torch.tensor([index])


def exits_at(length: int, bad: int, hard: bool = False) -> ExitsAt:
    return ExitsAt(length, bad, hard)


class SlowBlocks(Dataset):
    """Item i is ``size`` float32s of value i, after ``delay`` seconds (a busy worker, real payloads)."""

    def __init__(self, length: int, delay: float, size: int) -> None:
        self.length = length
        self.delay = delay
        self.size = size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.full((self.size,), float(index))


def slow_blocks(length: int, delay: float, size: int) -> SlowBlocks:
    return SlowBlocks(length, delay, size)
