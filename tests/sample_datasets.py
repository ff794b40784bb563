"""Map-style datasets that tests serve through the `python` source and also load locally."""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset


class IndexedDict(Dataset):
    """Item i: a dict of float32, int64 and uint8 fields, all derived from i."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(index)
        return {
            "index": index,
            "features": torch.randn(5, generator=g),
            "pixels": torch.randint(0, 256, (2, 3), generator=g, dtype=torch.uint8),
        }


class IndexedTuple(Dataset):
    """Item i: ``(features, label)`` with a nested dict of extras."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(1000 + index)
        return (
            torch.randn(4, generator=g, dtype=torch.float64),
            index % 7,
            {"id": torch.tensor([index, -index])},
        )


class SlowIndexed(IndexedDict):
    """``IndexedDict`` taking ``delay`` seconds per item: a stream that cannot run ahead
    of its reader, so a test can kill or drain a server while an epoch is surely underway."""

    def __init__(self, length: int, delay: float) -> None:
        super().__init__(length)
        self.delay = delay

    def __getitem__(self, index: int):
        time.sleep(self.delay)
        return super().__getitem__(index)


class Failing(Dataset):
    """Raises at one index; fine elsewhere."""

    def __init__(self, length: int, bad_index: int) -> None:
        self.length = length
        self.bad_index = bad_index

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.bad_index:
            raise ValueError(f"corrupt record {index}")
        return torch.tensor([index])


class Crashing(Dataset):
    """Kills its worker process at one index the first ``times`` times (marker files count)."""

    def __init__(self, length: int, bad_index: int, marker_dir: str, times: int = 1) -> None:
        self.length = length
        self.bad_index = bad_index
        self.marker_dir = marker_dir
        self.times = times

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.bad_index:
            crashes = len(os.listdir(self.marker_dir))
            if crashes < self.times:
                open(os.path.join(self.marker_dir, f"crash-{crashes}"), "w").close()
                os._exit(13)
        return torch.tensor([index])


def indexed_dict(length: int = 103) -> IndexedDict:
    return IndexedDict(length)


def indexed_tuple(length: int = 50) -> IndexedTuple:
    return IndexedTuple(length)


def failing(length: int = 40, bad_index: int = 13) -> Failing:
    return Failing(length, bad_index)


def crashing(
    length: int = 40, bad_index: int = 13, marker_dir: str = "", times: int = 1
) -> Crashing:
    return Crashing(length, bad_index, marker_dir, times)
