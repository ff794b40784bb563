"""Decoding a sample's bytes by extension, with the WebDataset package's conventions.

Image modes carry the WebDataset names so a config reads the same as
``webdataset.decode(MODE)``: ``rgb8``/``l8``/``rgba8`` give HWC (HW for ``l8``)
uint8 tensors, ``torchrgb8`` CHW uint8, ``torchrgb`` CHW float32 in [0, 1],
``pil``/``pilrgb`` an RGB PIL image (for the image transforms).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

IMAGE_EXTENSIONS = frozenset(
    [
        "jpg",
        "jpeg",
        "png",
        "ppm",
        "pgm",
        "pbm",
        "pnm",
        "bmp",
        "webp",
        "tif",
        "tiff",
        "gif",
    ]  # Pillow reads them all
)
IMAGE_MODES = ("rgb8", "l8", "rgba8", "torchrgb8", "torchrgb", "pil", "pilrgb")
INTEGER_EXTENSIONS = frozenset({"cls", "cls2", "index", "inx", "id"})
TEXT_EXTENSIONS = frozenset({"txt", "text", "transcript"})


def decode_image(data: bytes, mode: str) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        pil_mode = {"l8": "L", "rgba8": "RGBA"}.get(mode, "RGB")
        converted = image.convert(pil_mode)
    if mode in ("pil", "pilrgb"):
        return converted
    pixels = np.asarray(converted)
    if mode in ("rgb8", "l8", "rgba8"):
        return torch.from_numpy(pixels.copy())
    chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return chw if mode == "torchrgb8" else chw.to(torch.float32) / 255.0


def decode(extension: str, data: bytes, image_mode: str) -> Any:
    """The value of one member: its extension's last part names the decoder."""
    kind = extension.rsplit(".", 1)[-1].lower()
    if kind in IMAGE_EXTENSIONS:
        return decode_image(data, image_mode)
    if kind == "npy":
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    if kind == "json":
        return json.loads(data)
    if kind in TEXT_EXTENSIONS:
        return data.decode("utf-8")
    if kind in INTEGER_EXTENSIONS:
        return int(data)
    return data  # unknown: the raw bytes, as WebDataset leaves them
