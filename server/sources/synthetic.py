"""``synthetic``: deterministic random tensors of declared shapes, for load tests.

Sample i of field f is drawn from an RNG seeded by ``(seed, i, f)``, so every
worker and every server produces the same data without storing any.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchwire.server.config import Table

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
        default_high = (
            2 if self.dtype is torch.bool else (256 if self.dtype is torch.uint8 else 1000)
        )
        self.low = table.get("low", int, 0)
        self.high = table.get("high", int, default_high)
        if self.dtype_name in _INTS and self.high <= self.low:
            raise table.error("high", f"must be greater than low ({self.low}), got {self.high}")
        self.index = index

    def sample(self, seed: int, item: int) -> torch.Tensor:
        rng = np.random.default_rng((seed, item, self.index))
        if self.dtype_name in _FLOATS:
            values = rng.standard_normal(self.shape, dtype=np.float32)
            return torch.from_numpy(values).to(self.dtype)
        if self.dtype is torch.bool:
            return torch.from_numpy(rng.integers(0, 2, self.shape, dtype=np.uint8).astype(bool))
        numpy_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return torch.from_numpy(rng.integers(self.low, self.high, self.shape, dtype=numpy_dtype))


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
        seed=table.get("seed", int, 0),
        fields=fields,
        item=table.choice("item", ["dict", "tuple"], "dict"),
    )
