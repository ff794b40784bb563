"""Per-sample transforms declared in the config, reproducible whatever worker runs them.

Every transform is called as ``transform(value, generator)``. Random ones draw
only from ``generator``, a ``torch.Generator`` made for one sample by
``sample_generator(seed, epoch, index)``: the same request gives bit-identical
batches with 1 worker or 8, and another epoch gives other augmentations. A
trainer reproduces a server's batch locally by calling the same transforms
with the same generator.

Built-ins work on PIL images and on ``(..., H, W)`` tensors, in the spirit of
torchvision (which the server does not depend on). Any callable can be named
by import path; it receives the generator if it accepts a ``generator``
keyword.

``transform_config`` builds them from the config's ``transforms`` keys.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

_MASK64 = (1 << 64) - 1


class Transform(Protocol):
    def __call__(self, value: Any, generator: torch.Generator) -> Any: ...


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of sample ``index`` in ``epoch`` of a stream seeded ``seed``.

    SeedSequence mixes the three numbers, so neighbouring samples and epochs
    get unrelated streams (``seed + epoch + index`` would collide).
    """
    sequence = np.random.SeedSequence([seed & _MASK64, epoch, index])
    return int(sequence.generate_state(1, np.uint64)[0])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The one RNG that sample ``index``'s random transforms draw from."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, epoch, index))
    return generator


# -- image helpers: PIL images and (..., H, W) tensors ---------------------------------


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")


def image_size(value: Any) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or a ``(..., H, W)`` tensor."""
    if _is_pil(value):
        return value.height, value.width
    if isinstance(value, torch.Tensor) and value.dim() >= 2:
        return int(value.shape[-2]), int(value.shape[-1])
    raise TypeError(f"expected a PIL image or a (..., H, W) tensor, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def crop(value: Any, top: int, left: int, height: int, width: int) -> Any:
    if _is_pil(value):
        return value.crop((left, top, left + width, top + height))
    return value[..., top : top + height, left : left + width]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ToTensor:
    """PIL image or HWC array → CHW tensor; uint8 becomes float32 in [0, 1] (as torchvision)."""

    def __call__(self, value: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        array = np.array(value, copy=True)  # PIL images convert through the array interface
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise TypeError(f"ToTensor expects an image or an HWC array, got shape {array.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor.to(torch.float32).div_(255) if tensor.dtype == torch.uint8 else tensor

    def __repr__(self) -> str:
        return "ToTensor()"


INTERPOLATIONS = {"nearest": 0, "bilinear": 2, "bicubic": 3}


class Resize:
    """Resizes to ``size`` ([h, w]), or the shorter edge to ``size`` keeping the aspect ratio."""

    def __init__(self, size: int | Sequence[int], interpolation: str = "bilinear") -> None:
        self.size = size
        self.interpolation = interpolation

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if not isinstance(self.size, int):
            return _pair(self.size)
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if height <= width else (new_long, self.size)

    def __call__(self, value: Any, generator: torch.Generator | None = None) -> Any:
        height, width = self.output_size(*image_size(value))
        if _is_pil(value):
            return value.resize((width, height), INTERPOLATIONS[self.interpolation])
        batched = value.reshape(-1, *value.shape[-3:]) if value.dim() >= 3 else value[None, None]
        floats = batched.to(torch.float32) if not batched.is_floating_point() else batched
        smooth = self.interpolation != "nearest"
        resized = F.interpolate(
            floats,
            size=(height, width),
            mode=self.interpolation,
            align_corners=False if smooth else None,
            antialias=smooth,
        )
        if not value.is_floating_point():
            resized = resized.round_().clamp_(*_int_range(value.dtype)).to(value.dtype)
        return resized.reshape(*value.shape[:-2], height, width)

    def __repr__(self) -> str:
        return f"Resize(size={self.size!r}, interpolation={self.interpolation!r})"


def _int_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


class CenterCrop:
    """Crops the centre ``size`` ([h, w] or a square side); the image must be at least that big."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, value: Any, generator: torch.Generator | None = None) -> Any:
        height, width = image_size(value)
        crop_h, crop_w = self.size
        if crop_h > height or crop_w > width:
            raise ValueError(f"CenterCrop{self.size} is larger than the image ({height}x{width})")
        top = round((height - crop_h) / 2.0)
        left = round((width - crop_w) / 2.0)
        return crop(value, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"CenterCrop(size={list(self.size)})"


class RandomCrop:
    """Pads by ``padding`` (with ``fill``), then crops ``size`` at a position drawn from the RNG."""

    def __init__(self, size: int | Sequence[int], padding: int = 0, fill: float = 0) -> None:
        self.size = _pair(size)
        self.padding = padding
        self.fill = fill

    def __call__(self, value: Any, generator: torch.Generator) -> Any:
        if self.padding:
            value = self._pad(value)
        height, width = image_size(value)
        crop_h, crop_w = self.size
        if crop_h > height or crop_w > width:
            raise ValueError(f"RandomCrop{self.size} is larger than the image ({height}x{width})")
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
        return crop(value, top, left, crop_h, crop_w)

    def _pad(self, value: Any) -> Any:
        p = self.padding
        if _is_pil(value):
            from PIL import ImageOps

            fill = (
                int(self.fill)
                if value.mode in ("L", "P", "I")
                else (int(self.fill),) * len(value.getbands())
            )
            return ImageOps.expand(value, border=p, fill=fill)
        return F.pad(value, (p, p, p, p), value=self.fill)

    def __repr__(self) -> str:
        return f"RandomCrop(size={list(self.size)}, padding={self.padding}, fill={self.fill})"


class RandomHorizontalFlip:
    """Mirrors left-right with probability ``p``, drawn from the RNG (one draw per call)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, value: Any, generator: torch.Generator) -> Any:
        if float(torch.rand(1, generator=generator)) >= self.p:
            return value
        if _is_pil(value):
            return value.transpose(0)  # Image.Transpose.FLIP_LEFT_RIGHT
        image_size(value)
        return value.flip(-1)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """``(x - mean) / std`` per channel of a float ``(C, H, W)`` tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __call__(self, value: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(
                f"Normalize expects a float tensor (add ToTensor), got {_describe(value)}"
            )
        if value.dim() < 3 or value.shape[-3] != len(self.mean):
            raise ValueError(
                f"Normalize has {len(self.mean)} channels, the tensor has shape {tuple(value.shape)}"
            )
        mean = self.mean.to(value.dtype)[:, None, None]
        std = self.std.to(value.dtype)[:, None, None]
        return (value - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class Compose:
    """Applies ``transforms`` in order, all drawing from the same per-sample RNG."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, value: Any, generator: torch.Generator) -> Any:
        for transform in self.transforms:
            value = transform(value, generator)
        return value

    def __repr__(self) -> str:
        return f"Compose([{', '.join(map(repr, self.transforms))}])"


class CallableTransform:
    """A callable named by import path; gets ``generator=`` only if it accepts one."""

    def __init__(self, path: str, function: Callable[..., Any]) -> None:
        self.path = path
        self.function = function
        self.takes_generator = _accepts_generator(function)

    def __call__(self, value: Any, generator: torch.Generator) -> Any:
        if self.takes_generator:
            return self.function(value, generator=generator)
        return self.function(value)

    def __repr__(self) -> str:
        return self.path


def _accepts_generator(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    # Only an explicit `generator` parameter: a generic **kwargs wrapper (an nn.Module's
    # __call__, a partial) would pass it on to code that does not take it.
    return "generator" in parameters


__all__ = [
    "CallableTransform",
    "CenterCrop",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "ToTensor",
    "Transform",
    "sample_generator",
    "sample_seed",
]
