"""``timeseries``: sliding windows over a 1-D or 2-D array → ``(sequence, target)``.

Window i covers rows ``[i * stride, i * stride + length)`` and its target is the
``horizon`` rows right after it (a scalar row when ``horizon = 1`` and
``squeeze_target``). The array stays memory-mapped, so windows overlap in the
page cache rather than in each worker's heap.
"""

from __future__ import annotations

import zipfile
from typing import Any

import numpy as np
import torch

from batchwire.server.config import Table
from batchwire.server.sources.arrays import load_npz, map_npy


class TimeseriesDataset:
    field_names = ("sequence", "target")

    def __init__(
        self, array: np.ndarray, *, length: int, horizon: int, stride: int, squeeze_target: bool
    ) -> None:
        self.array = array
        self.length = length
        self.horizon = horizon
        self.stride = stride
        self.squeeze_target = squeeze_target
        self.count = (len(array) - length - horizon) // stride + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(f"window {index} out of range for {self.count} windows")
        start = index * self.stride
        end = start + self.length
        sequence = torch.from_numpy(np.array(self.array[start:end]))
        target = np.array(self.array[end : end + self.horizon])
        if self.squeeze_target and self.horizon == 1:
            target = target[0]
        return sequence, torch.from_numpy(np.asarray(target))


def build(table: Table) -> TimeseriesDataset:
    table.reject_unknown({"path", "key", "length", "horizon", "stride", "squeeze_target"})
    path = table.path("path")
    try:
        if path.suffix == ".npz":
            key = table.get("key", str)
            array: Any = load_npz(path, [key])[key]
        else:
            array = map_npy(path)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise table.error("path", f"cannot read {path}: {exc}") from None
    if array.ndim not in (1, 2):
        raise table.error("path", f"expected a 1-D or 2-D array, got shape {array.shape}")
    length = table.positive_int("length")
    horizon = table.positive_int("horizon", 1)
    stride = table.positive_int("stride", 1)
    if length + horizon > len(array):
        raise table.error(
            "length",
            f"length + horizon = {length + horizon} exceeds the {len(array)} rows of {path.name}",
        )
    return TimeseriesDataset(
        array,
        length=length,
        horizon=horizon,
        stride=stride,
        squeeze_target=table.get("squeeze_target", bool, True),
    )
