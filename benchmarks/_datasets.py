"""Datasets whose workers do no work, for measuring the wire alone.

The tf.data service figures in RESULTS.md come from a worker that does no
work; these are batchwire's equivalent: every item is one of a few tensors
made once per worker, so a batch costs only the collate and the write to
shared memory, not random-number generation.
"""

from __future__ import annotations

import torch


class Repeating(torch.utils.data.Dataset):
    """``length`` items cycling over ``distinct`` pre-made items.

    ``pattern="noise"``: uniform random values (incompressible);
    ``"smooth"``: photo-like uint8-range images (compressible).
    """

    def __init__(
        self, length: int, shape: list[int], dtype: str, distinct: int = 16, pattern: str = "noise"
    ) -> None:
        self.length = length
        generator = torch.Generator().manual_seed(0)
        kind = getattr(torch, dtype)
        if pattern == "smooth":
            make = lambda: _smooth(shape, generator).to(kind)  # noqa: E731
        elif kind.is_floating_point:
            make = lambda: torch.randn(shape, generator=generator).to(kind)  # noqa: E731
        else:
            make = lambda: torch.randint(0, 256, shape, generator=generator, dtype=kind)  # noqa: E731
        self.items = [make() for _ in range(distinct)]
        self.labels = torch.arange(distinct, dtype=torch.int64)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k = index % len(self.items)
        return {"image": self.items[k], "label": self.labels[k]}


def _smooth(shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """Large flat regions at a few levels plus one bit of noise, like a posterised photo."""
    channels, height, width = shape
    coarse = torch.rand((channels, 1, height // 16 + 1, width // 16 + 1), generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="nearest")[:, 0]
    noise = torch.randint(0, 2, (channels, height, width), generator=generator)
    return ((image * 8).floor() * 32 + noise).clamp(0, 255)


def repeating(
    length: int,
    shape: list[int],
    dtype: str = "float32",
    distinct: int = 16,
    pattern: str = "noise",
) -> Repeating:
    return Repeating(length, shape, dtype, distinct, pattern)


class Rows(torch.utils.data.Dataset):
    """The rows of .npy files (``{field: path}``), memory-mapped, a sample at a time.

    What a DataLoader user of the ``arrays`` source's files would write: item i
    is ``{field: tensor of row i}`` (copied out of the read-only map).
    """

    def __init__(self, files: dict[str, str]) -> None:
        import numpy as np

        self.arrays = {field: np.load(path, mmap_mode="r") for field, path in files.items()}
        self.length = len(next(iter(self.arrays.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import numpy as np

        return {field: torch.from_numpy(np.array(a[index])) for field, a in self.arrays.items()}
