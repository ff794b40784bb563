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

Config (per dataset; a bare string is a transform without parameters)::

    transforms.image = ["ToTensor", { name = "RandomCrop", size = 24, padding = 2 }]
    transforms = [{ name = "my_pkg.aug:mix", kwargs = { alpha = 0.2 } }]   # whole item
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from batchwire.server.config import ConfigError, Table
from batchwire.server.sources.python import import_object

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


_PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3}


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
            return value.resize((width, height), _PIL_FILTERS[self.interpolation])
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


# -- building transforms from the config -------------------------------------------------


def _size(table: Table, name: str, default: Any = ...) -> int | list[int]:
    value = (
        table.get(name, (int, list)) if default is ... else table.get(name, (int, list), default)
    )
    sizes = [value] if isinstance(value, int) else value
    if len(sizes) not in ((1,) if isinstance(value, int) else (2,)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise table.error(name, f"expected a positive integer or [height, width], got {value!r}")
    return value


def _floats(table: Table, name: str) -> list[float]:
    values = table.get(name, list)
    if not values or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise table.error(name, f"expected a non-empty array of numbers, got {values!r}")
    return [float(v) for v in values]


def _build_resize(table: Table) -> Transform:
    table.reject_unknown({"name", "size", "interpolation"})
    return Resize(_size(table, "size"), table.choice("interpolation", _PIL_FILTERS, "bilinear"))


def _build_center_crop(table: Table) -> Transform:
    table.reject_unknown({"name", "size"})
    return CenterCrop(_size(table, "size"))


def _build_random_crop(table: Table) -> Transform:
    table.reject_unknown({"name", "size", "padding", "fill"})
    padding = table.get("padding", int, 0)
    if padding < 0:
        raise table.error("padding", f"expected a non-negative integer, got {padding}")
    return RandomCrop(_size(table, "size"), padding, float(table.get("fill", float, 0)))


def _build_flip(table: Table) -> Transform:
    table.reject_unknown({"name", "p"})
    p = float(table.get("p", float, 0.5))
    if not 0.0 <= p <= 1.0:
        raise table.error("p", f"expected a probability in [0, 1], got {p}")
    return RandomHorizontalFlip(p)


def _build_normalize(table: Table) -> Transform:
    table.reject_unknown({"name", "mean", "std"})
    mean, std = _floats(table, "mean"), _floats(table, "std")
    if len(mean) != len(std):
        raise table.error("std", f"has {len(std)} values but mean has {len(mean)}")
    if any(s == 0 for s in std):
        raise table.error("std", f"must not contain 0 (division by zero), got {std}")
    return Normalize(mean, std)


def _build_to_tensor(table: Table) -> Transform:
    table.reject_unknown({"name"})
    return ToTensor()


def _build_compose(table: Table) -> Transform:
    table.reject_unknown({"name", "transforms"})
    return Compose(build_transform_list(table, "transforms"))


BUILTINS: dict[str, Callable[[Table], Transform]] = {
    "CenterCrop": _build_center_crop,
    "Compose": _build_compose,
    "Normalize": _build_normalize,
    "RandomCrop": _build_random_crop,
    "RandomHorizontalFlip": _build_flip,
    "Resize": _build_resize,
    "ToTensor": _build_to_tensor,
}


def _build_imported(table: Table, path: str) -> Transform:
    table.reject_unknown({"name", "kwargs"})
    try:
        target = import_object(path)
    except ValueError as exc:
        raise table.error("name", str(exc)) from None
    if "kwargs" in table.data:  # a factory: call it once to get the transform
        kwargs = table.get("kwargs", dict)
        try:
            target = target(**kwargs)
        except Exception as exc:
            raise table.error(
                "kwargs", f"{path}(**kwargs) raised {type(exc).__name__}: {exc}"
            ) from exc
    if not callable(target):
        raise table.error("name", f"{path} is a {type(target).__name__}, not callable")
    return CallableTransform(path, target)


def build_transform(table: Table) -> Transform:
    """One ``{ name = ..., params }`` entry: a built-in name or ``package.module:callable``."""
    name = table.get("name", str)
    if ":" in name:
        return _build_imported(table, name)
    builder = BUILTINS.get(name)
    if builder is None:
        raise table.error(
            "name",
            f"unknown transform {name!r}; expected one of {', '.join(sorted(BUILTINS))} "
            "or an import path 'package.module:callable'",
        )
    return builder(table)


def build_transform_list(table: Table, name: str) -> list[Transform]:
    """The array ``table[name]``, each entry a transform table or a bare name."""
    entries = table.get(name, list)
    transforms = []
    for i, entry in enumerate(entries):
        key = f"{name}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping):
            raise table.error(
                key, f"expected a transform name or table {{ name = ... }}, got {entry!r}"
            )
        transforms.append(build_transform(Table(entry, file=table.file, prefix=table.key(key))))
    return transforms


# -- applying transforms to a whole item -------------------------------------------------


class ItemTransforms:
    """Transforms per field of an item (in config order), then those of the whole item.

    A field is a dict key, a tuple position ("0"), or a name the source gives
    its tuple positions (``field_names``, e.g. image_folder's "image" and "label").
    """

    def __init__(
        self,
        fields: Mapping[str, Compose],
        whole: Compose | None,
        field_names: Sequence[str] = (),
    ) -> None:
        self.fields = dict(fields)
        self.whole = whole
        self.field_names = tuple(field_names)

    def __call__(self, item: Any, generator: torch.Generator) -> Any:
        if self.fields:
            if isinstance(item, Mapping):
                item = dict(item)
                for name, transform in self.fields.items():
                    if name not in item:
                        raise KeyError(f"transforms.{name}: the item has no field {name!r}")
                    item[name] = transform(item[name], generator)
            elif isinstance(item, tuple | list):
                values = list(item)
                for name, transform in self.fields.items():
                    position = self._position(name, len(values))
                    values[position] = transform(values[position], generator)
                item = type(item)(values) if isinstance(item, list) else tuple(values)
            else:
                raise TypeError(
                    f"per-field transforms need dict or tuple items, got a {type(item).__name__}"
                )
        return self.whole(item, generator) if self.whole is not None else item

    def _position(self, name: str, size: int) -> int:
        if name in self.field_names:
            return self.field_names.index(name)
        if name.isdigit() and int(name) < size:
            return int(name)
        raise KeyError(f"transforms.{name}: the item is a tuple of {size} without that field")

    def describe(self) -> list[str]:
        lines = [f"{name}: {transform!r}" for name, transform in self.fields.items()]
        if self.whole is not None:
            lines.append(f"(item): {self.whole!r}")
        return lines


def build_item_transforms(
    table: Table, name: str, field_names: Sequence[str] = ()
) -> ItemTransforms | None:
    """Reads ``transforms`` (an array for the whole item, or a table of arrays per field)."""
    if name not in table.data:
        return None
    value = table.data[name]
    if isinstance(value, list):
        return ItemTransforms({}, Compose(build_transform_list(table, name)), field_names)
    per_field = table.table(name)
    fields: dict[str, Compose] = {}
    for field in per_field.data:
        if field_names and field not in field_names and not field.isdigit():
            raise per_field.error(
                field, f"unknown field; this source's items have {', '.join(field_names)}"
            )
        fields[field] = Compose(build_transform_list(per_field, field))
    return ItemTransforms(fields, None, field_names)


__all__ = [
    "BUILTINS",
    "CallableTransform",
    "CenterCrop",
    "Compose",
    "ConfigError",
    "ItemTransforms",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "ToTensor",
    "Transform",
    "build_item_transforms",
    "build_transform",
    "build_transform_list",
    "sample_generator",
    "sample_seed",
]
