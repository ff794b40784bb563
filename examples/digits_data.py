"""scikit-learn's bundled handwritten digits (no download) as torch Datasets.

The server imports this through `python_path` in digits.toml; the training
script imports it too, for its local baseline. Same split on both sides.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load(split: str = "train", with_index: bool = False) -> TensorDataset:
    """``split`` is "train" (1437 images) or "test" (360): ``(pixels float32[64] in [0, 1], label int64)``.

    ``with_index=True`` adds each item's index in the split as a third field, so
    that a trainer can tell which samples it received (train_ddp.py --record).
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split should be 'train' or 'test', but got split={split!r}")
    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    cut = int(len(order) * (1 - TEST_FRACTION))
    chosen = order[:cut] if split == "train" else order[cut:]
    pixels = torch.from_numpy(digits.data[chosen].astype(np.float32) / 16.0)
    labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
    if with_index:
        return TensorDataset(pixels, labels, torch.arange(len(labels)))
    return TensorDataset(pixels, labels)
