"""Datasets for the resume tests, served through the `python` source."""

from __future__ import annotations

import torch
from sample_datasets import SlowIndexed


def slow_indexed(length: int = 200, delay: float = 0.002) -> SlowIndexed:
    return SlowIndexed(length, delay)


class IndexedPair:
    """Item i: ``(tensor([i.0]), i)``: batches ``[x, y]`` whose ``y`` names the samples."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return torch.tensor([float(index)]), index


def indexed_pair(length: int = 61) -> IndexedPair:
    return IndexedPair(length)
