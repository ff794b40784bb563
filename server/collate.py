"""Collation: how a list of samples becomes one batch.

- ``"default"``: ``torch.utils.data.default_collate``.
- ``{ kind = "pad", ... }``: variable-length fields are padded to the longest
  in the batch along their first dimension, and each gets a lengths tensor
  (``NAME_lengths`` next to a dict field; appended at the end of a tuple item,
  in field order). ``padding_value`` is one number, or a table per field.
- ``"package.module:function"``: any collate function named by the config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import default_collate

from batchwire.server.config import Table
from batchwire.server.sources.python import import_object

CollateFn = Callable[[list[Any]], Any]


class PadCollate:
    """Pads ``fields`` (default: every tensor field with a dimension) and adds their lengths."""

    def __init__(
        self,
        fields: Sequence[str] | None,
        padding_values: Mapping[str, float],
        default_padding: float,
        field_names: Sequence[str] = (),
    ) -> None:
        self.fields = list(fields) if fields is not None else None
        self.padding_values = dict(padding_values)
        self.default_padding = default_padding
        self.field_names = tuple(field_names)

    def __call__(self, samples: list[Any]) -> Any:
        first = samples[0]
        if isinstance(first, Mapping):
            names = list(first)
            columns = {name: [s[name] for s in samples] for name in names}
            out: dict[str, Any] = {}
            for name in names:
                if self._pads(name, columns[name]):
                    out[name], out[f"{name}_lengths"] = self._pad(name, columns[name])
                else:
                    out[name] = default_collate(columns[name])
            return out
        if isinstance(first, tuple | list):
            items: list[Any] = []
            lengths: list[torch.Tensor] = []
            for position in range(len(first)):
                name = self._name(position)
                column = [s[position] for s in samples]
                if self._pads(name, column):
                    padded, column_lengths = self._pad(name, column)
                    items.append(padded)
                    lengths.append(column_lengths)
                else:
                    items.append(default_collate(column))
            return (*items, *lengths)
        padded, lengths = self._pad("", list(samples))
        return padded, lengths

    def _name(self, position: int) -> str:
        if position < len(self.field_names):
            return self.field_names[position]
        return str(position)

    def _pads(self, name: str, column: list[Any]) -> bool:
        if self.fields is not None:
            return name in self.fields or (
                name in self.field_names and str(self.field_names.index(name)) in self.fields
            )
        return all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in column)

    def _pad(self, name: str, column: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = [torch.as_tensor(v) for v in column]
        if any(t.dim() == 0 for t in tensors):
            raise ValueError(f"pad: field {name or 'item'!r} has a scalar value; nothing to pad")
        lengths = torch.tensor([len(t) for t in tensors], dtype=torch.int64)
        value = self.padding_values.get(name, self.default_padding)
        return pad_sequence(tensors, batch_first=True, padding_value=value), lengths

    def __repr__(self) -> str:
        return f"pad(fields={self.fields}, padding_value={self.default_padding})"


def build_collate(table: Table, name: str, field_names: Sequence[str] = ()) -> CollateFn:
    """Reads ``collate`` of a dataset table: "default", a pad table, or an import path."""
    if name not in table.data:
        return default_collate
    value = table.data[name]
    if isinstance(value, str):
        if value == "default":
            return default_collate
        if value == "pad":
            return PadCollate(None, {}, 0.0, field_names)
        if ":" not in value:
            raise table.error(
                name,
                f"unknown collate {value!r}; expected 'default', 'pad', a pad table "
                "or an import path 'package.module:function'",
            )
        try:
            function = import_object(value)
        except ValueError as exc:
            raise table.error(name, str(exc)) from None
        if not callable(function):
            raise table.error(name, f"{value} is a {type(function).__name__}, not callable")
        return function
    spec = table.table(name)
    spec.reject_unknown({"kind", "fields", "padding_value"})
    spec.choice("kind", ["pad"])
    fields = spec.get("fields", list, None)
    if fields is not None and not all(isinstance(f, str) for f in fields):
        raise spec.error("fields", f"expected an array of field names, got {fields!r}")
    padding = spec.get("padding_value", (float, dict), 0.0)
    per_field: dict[str, float] = {}
    default = 0.0
    if isinstance(padding, dict):
        padding_table = spec.table("padding_value")
        for field in padding_table.data:
            per_field[field] = float(padding_table.get(field, float))
    else:
        default = float(padding)
    return PadCollate(fields, per_field, default, field_names)


def describe_collate(function: CollateFn) -> str:
    if function is default_collate:
        return "default"
    if isinstance(function, PadCollate):
        return repr(function)
    return f"{function.__module__}:{getattr(function, '__qualname__', repr(function))}"
