"""The issue's batch shapes, free of imports so that the tf.data peer (its own venv) shares them.

name -> (batch size, image shape, image dtype); every item also has an int64 label.
"""

from __future__ import annotations

SHAPES: dict[str, tuple[int, list[int], str]] = {
    "mnist": (64, [784], "float32"),
    "cifar": (256, [3, 32, 32], "float32"),
    "imagenet": (64, [3, 224, 224], "uint8"),
    "big": (256, [3, 224, 224], "uint8"),
}


def batch_bytes(name: str) -> int:
    """Bytes of one batch's tensors (images and int64 labels), without alignment."""
    batch_size, shape, dtype = SHAPES[name]
    item = 4 if dtype == "float32" else 1
    for size in shape:
        item *= size
    return batch_size * (item + 8)
