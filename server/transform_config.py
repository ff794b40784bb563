"""Transforms from the config: ``transforms`` arrays and tables → callables, with key-naming errors.

Config (per dataset; a bare string is a transform without parameters)::

    transforms.image = ["ToTensor", { name = "RandomCrop", size = 24, padding = 2 }]
    transforms = [{ name = "my_pkg.aug:mix", kwargs = { alpha = 0.2 } }]   # whole item

``ItemTransforms`` applies them to an item: per field (in config order), then
to the whole item, all drawing from the sample's one generator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from batchwire.server.config import Table
from batchwire.server.sources.python import import_object
from batchwire.server.transforms import (
    INTERPOLATIONS,
    CallableTransform,
    CenterCrop,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ToTensor,
    Transform,
)


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
    return Resize(_size(table, "size"), table.choice("interpolation", INTERPOLATIONS, "bilinear"))


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
    "ItemTransforms",
    "build_item_transforms",
    "build_transform",
    "build_transform_list",
]
