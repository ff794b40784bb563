"""Datasets for the stream's unit tests (``python`` source, built in the test process)."""

from __future__ import annotations

import os
import time

import torch


class Numbered:
    """Item i is ``size`` copies of i; item ``fail`` raises; each load appends i to ``counter``."""

    def __init__(
        self, length: int, size: int = 1, fail: int = -1, counter: str = "", delay: float = 0.0
    ) -> None:
        self.length = length
        self.delay = delay
        self.size = size
        self.fail = fail
        self.counter = counter

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.delay)
        if self.counter:
            fd = os.open(self.counter, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, f"{index}\n".encode())
            finally:
                os.close(fd)
        if index == self.fail:
            raise ValueError(f"item {index} is broken")
        return torch.full((self.size,), index, dtype=torch.int64)


def numbered(
    length: int, size: int = 1, fail: int = -1, counter: str = "", delay: float = 0.0
) -> Numbered:
    return Numbered(length, size, fail, counter, delay)
