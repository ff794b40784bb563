"""``synthetic``: deterministic random tensors of declared shapes, for load tests.

Each field draws one bank of random values at start-up, from an RNG seeded by
``(seed, field)``: its sample's size plus ``SPAN`` values. Sample i of field f
is the window of the bank starting at an offset hashed from ``(seed, i, f)``,
so every worker and every server produces the same data without storing any,
and a batch costs one gather (a memory copy), like a worker that does no work.
Drawing each sample from its own RNG instead cost 2-8 CPU-seconds per GB, more
than the whole wire path (benchmarks/RESULTS.md), so a load test measured the
RNG. Samples are distinct windows of one random sequence, not independent
draws: right for load tests, wrong for statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from batchwire.server.config import Table

_BITS = 20
SPAN = 1 << _BITS
"""Window offsets per field: samples i and j are equal only if they are a multiple of SPAN apart."""

_FLOATS = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_INTS = {
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}
DTYPES = {**_FLOATS, **_INTS, "bool": torch.bool}


class SyntheticField:
    def __init__(self, table: Table, index: int) -> None:
        table.reject_unknown({"shape", "dtype", "low", "high"})
        shape = table.get("shape", list)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise table.error("shape", f"expected an array of non-negative integers, got {shape!r}")
        self.shape = tuple(shape)
        self.dtype_name = table.choice("dtype", DTYPES, "float32")
        self.dtype = DTYPES[self.dtype_name]
        default_high = 2 if self.dtype is torch.bool else 1000
        if self.dtype_name in _INTS:  # values are drawn from [low, high): within the dtype
            limits = torch.iinfo(self.dtype)
            default_high = min(default_high, limits.max + 1)
        self.low = table.get("low", int, 0)
        self.high = table.get("high", int, default_high)
        if self.dtype_name in _INTS:
            if self.high <= self.low:
                raise table.error("high", f"must be greater than low ({self.low}), got {self.high}")
            if self.low < limits.min or self.high > limits.max + 1:
                raise table.error(
                    "high",
                    f"[low, high) = [{self.low}, {self.high}) does not fit {self.dtype_name} "
                    f"([{limits.min}, {limits.max + 1}))",
                )
        self.index = index

        self.numel = int(np.prod(self.shape, dtype=np.int64))
        self._bank: torch.Tensor | None = None

    def bank(self, seed: int) -> torch.Tensor:
        """``numel + SPAN`` random values of this field, drawn once (lazily: workers only)."""
        if self._bank is None:
            rng = np.random.default_rng((seed, self.index))
            size = self.numel + SPAN
            if self.dtype_name in _FLOATS:
                values = torch.from_numpy(rng.standard_normal(size, dtype=np.float32))
                self._bank = values.to(self.dtype)
            elif self.dtype is torch.bool:
                self._bank = torch.from_numpy(rng.integers(0, 2, size, dtype=np.uint8).astype(bool))
            else:
                numpy_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
                self._bank = torch.from_numpy(rng.integers(self.low, self.high, size, numpy_dtype))
        return self._bank

    def sample(self, seed: int, item: int) -> torch.Tensor:
        start = int(_offsets(seed, np.array([item]), self.index)[0])
        return self.bank(seed)[start : start + self.numel].clone().view(self.shape)

    def batch(self, seed: int, items: np.ndarray) -> torch.Tensor:
        """``torch.stack`` of ``sample(seed, i)`` for each i, in one gather."""
        if self.numel == 0:
            return torch.empty((len(items), *self.shape), dtype=self.dtype)
        bank = self.bank(seed)
        starts = _offsets(seed, items, self.index)
        if bank.dtype is torch.bfloat16:  # numpy has no bfloat16
            gathered = bank.unfold(0, self.numel, 1).index_select(0, torch.from_numpy(starts))
        else:
            windows = np.lib.stride_tricks.sliding_window_view(bank.numpy(), self.numel)
            gathered = torch.from_numpy(windows[starts])
        return gathered.view(len(items), *self.shape)


def _offsets(seed: int, items: np.ndarray, field: int) -> np.ndarray:
    """Window starts in ``[0, SPAN)``, scrambled; a bijection of ``item mod SPAN``.

    Multiplying by an odd number and xor-shifting are both invertible modulo a
    power of two, so two items share a window only if they are SPAN apart.
    """
    mask = np.uint64(SPAN - 1)
    key = np.uint64((seed * 0x9E3779B97F4A7C15 + field * 0xBF58476D1CE4E5B9) % (1 << 64))
    with np.errstate(over="ignore"):
        x = (items.astype(np.uint64) + key) & mask
        x = (x * np.uint64(0x2545F491)) & mask
        x ^= x >> np.uint64(_BITS // 2)
        x = (x * np.uint64(0x9E3779B1)) & mask
        x ^= x >> np.uint64(_BITS // 3)
    return x.astype(np.intp)


class SyntheticDataset:
    def __init__(
        self, length: int, seed: int, fields: dict[str, SyntheticField], item: str
    ) -> None:
        self.length = length
        self.seed = seed
        self.fields = fields
        self.item = item

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        values = {name: f.sample(self.seed, index) for name, f in self.fields.items()}
        return values if self.item == "dict" else tuple(values.values())

    def load_batch(self, indices: Sequence[int]) -> Any:
        """``default_collate([self[i] for i in indices])``, one gather per field."""
        items = np.asarray(indices, dtype=np.int64)
        if len(items) and not (items.min() >= 0 and items.max() < self.length):
            raise IndexError(f"an index is out of range for length {self.length}")
        values = {name: f.batch(self.seed, items) for name, f in self.fields.items()}
        # default_collate turns a batch of tuples into a list
        return values if self.item == "dict" else list(values.values())


def build(table: Table) -> SyntheticDataset:
    table.reject_unknown({"length", "seed", "fields", "item"})
    fields_table = table.table("fields")
    if not fields_table.data:
        raise table.error(
            "fields",
            'declare at least one field, e.g. fields.x = { shape = [4], dtype = "float32" }',
        )
    fields = {
        name: SyntheticField(fields_table.table(name), i)
        for i, name in enumerate(fields_table.data)
    }
    return SyntheticDataset(
        length=table.positive_int("length"),
        seed=_seed(table),
        fields=fields,
        item=table.choice("item", ["dict", "tuple"], "dict"),
    )


def _seed(table: Table) -> int:
    seed = table.get("seed", int, 0)
    if seed < 0:  # numpy seeds only with non-negative integers
        raise table.error("seed", f"expected a non-negative integer, got {seed}")
    return seed
