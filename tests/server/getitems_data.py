"""Datasets with PyTorch's batched ``__getitems__``, imported by the server's workers (``python`` source)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Rows(Dataset):
    """Item i: ``{"image": 3x8x8 uint8, "label": i % 10}``, the same whichever way it is fetched."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
        return {"image": image, "label": index % 10}


class BatchedOnly(Rows):
    """Reads a batch at once (``__getitems__``); one item at a time is refused.

    So a stream of it succeeds only where every batch takes the batched call,
    as DataLoader's fetcher does.
    """

    def __getitem__(self, index: int) -> dict:
        raise RuntimeError(f"item {index} fetched alone; __getitems__ should have been called")

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [Rows.__getitem__(self, index) for index in indices]


class BrokenBatch(Rows):
    """``__getitems__`` raises for any batch holding ``bad_index``; item by item all load."""

    def __init__(self, length: int, bad_index: int) -> None:
        super().__init__(length)
        self.bad_index = bad_index

    def __getitems__(self, indices: list[int]) -> list[dict]:
        if self.bad_index in indices:
            raise OSError("the batch read failed")
        return [self[index] for index in indices]


def rows(length: int) -> Rows:
    return Rows(length)


def batched_only(length: int) -> BatchedOnly:
    return BatchedOnly(length)


def broken_batch(length: int, bad_index: int) -> BrokenBatch:
    return BrokenBatch(length, bad_index)
