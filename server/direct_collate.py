"""``default_collate``, written straight into a batch's payload memory.

A worker used to collate a batch (``torch.stack``: one copy of every sample)
and then copy the result into its payload file (``pwrite``: a second copy).
For the common batch -- ``default_collate`` of items whose fields are tensors,
numpy arrays or Python numbers of one shape and dtype, nested in dicts, tuples
and lists -- the collated batch's layout is known from the items alone, so
the header comes first and each field is stacked once, into the payload's
mapped pages (``torch.stack(..., out=view)``). The bytes are those that
``default_collate`` and ``wire.write_payload`` would give.

Anything else (subclasses, ragged fields, mixed dtypes, strings, numpy
scalars, bools) is not planned: ``collate_into`` returns None and the caller
takes the general path, whose errors name the sample that broke.

A source that holds its samples as arrays (``arrays``) skips the items
altogether: ``gather_into`` takes each field's rows with one ``np.take``
straight into the payload (a batch used to be gathered into a new tensor,
then copied: two passes over its bytes, the first into fresh pages).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchwire import wire
from batchwire.v1 import batchwire_pb2 as pb

Reserve = Callable[[int], memoryview]
"""``reserve(size)``: writable memory for one payload of ``size`` bytes (contents undefined)."""

_DTYPE = operator.attrgetter("dtype")
_NUMBER_DTYPES = {int: torch.int64, float: torch.float64}  # what default_collate makes of them
_NUMPY_KINDS = frozenset("biuf")  # bool, signed, unsigned, float arrays: as_tensor then stack


class _NotPlain(Exception):
    """The samples need the general path (``default_collate``)."""


@dataclass
class _Column:
    """One leaf of the collated batch: how to write it, the samples' values, its dtype and shape."""

    how: str
    values: list[Any]
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Layout:
    header: pb.BatchHeader
    metas: list[pb.TensorMeta]
    size: int


_LAYOUTS: dict[tuple[Any, ...], _Layout] = {}
"""Headers by the batch's make-up (structure, dtypes, shapes): a worker's batches share a few,
and building one (flatten, layout, protobuf) cost a tenth of an mnist batch."""
_MAX_LAYOUTS = 256


def collate_into(samples: list[Any], reserve: Reserve) -> pb.BatchHeader | None:
    """``default_collate(samples)`` encoded into ``reserve(size)``; None: not planned here.

    On None, nothing or only part of the reserved memory was written: the
    caller writes the batch there again by the general path. The header is
    shared by the batches of one make-up: serialise it, do not change it.
    """
    if not samples:
        return None  # default_collate's own error
    columns: list[_Column] = []
    key: list[Any] = []
    try:
        nest = _plan(samples, columns, key)
        layout = _layout(tuple(key), nest, columns)
    except (_NotPlain, wire.WireError, KeyError, TypeError):
        return None  # KeyError: an item lacks a key; TypeError: a dtype torch has not
    try:
        _write(reserve(layout.size), columns, layout)
    except (RuntimeError, TypeError, ValueError, OverflowError):
        return None  # e.g. an int beyond int64: default_collate says so on the general path
    return layout.header


def _plan(samples: list[Any], columns: list[_Column], key: list[Any]) -> Any:
    """The collated batch's nest, with each leaf's index in ``columns`` in its place.

    Appends each leaf's column in the order ``wire.flatten`` visits leaves
    (dicts in key order, lists by position), and to ``key`` one entry per node
    in that order, which says all that the header depends on.
    """
    first = samples[0]
    kind = type(first)
    if len(set(map(type, samples))) != 1:  # map and set: no Python loop per sample
        raise _NotPlain
    if kind is torch.Tensor:
        # Shapes, devices and autograd are torch.stack's to check: with ``out=`` it
        # raises where they differ. A dtype it would convert, so that is checked here.
        if first.layout != torch.strided or first.is_nested:
            raise _NotPlain
        if len(set(map(_DTYPE, samples))) != 1:
            raise _NotPlain
        return _leaf("stack", samples, first.dtype, first.shape, columns, key)
    if kind is np.ndarray:
        shape, dtype = first.shape, first.dtype
        if dtype.kind not in _NUMPY_KINDS or not dtype.isnative:
            raise _NotPlain
        if any(sample.shape != shape or sample.dtype != dtype for sample in samples):
            raise _NotPlain
        return _leaf("numpy", samples, _torch_dtype(dtype), shape, columns, key)
    if kind in _NUMBER_DTYPES:
        return _leaf("number", samples, _NUMBER_DTYPES[kind], (), columns, key)
    if kind is dict:
        key.append(("dict", *first))
        return {name: _plan([sample[name] for sample in samples], columns, key) for name in first}
    if kind is tuple or kind is list:  # default_collate gives a list for both
        if any(len(sample) != len(first) for sample in samples):
            raise _NotPlain  # default_collate's own error says which
        key.append(("list", len(first)))
        return [_plan(list(column), columns, key) for column in zip(*samples, strict=True)]
    raise _NotPlain


def _leaf(
    how: str,
    values: list[Any],
    dtype: torch.dtype,
    shape: tuple[int, ...],
    columns: list[_Column],
    key: list[Any],
) -> int:
    columns.append(_Column(how, values, dtype, (len(values), *shape)))
    key.append((how, dtype, columns[-1].shape))
    return len(columns) - 1


def _layout(key: tuple[Any, ...], nest: Any, columns: list[_Column]) -> _Layout:
    layout = _LAYOUTS.get(key)
    if layout is None:
        header, metas = wire.header_for(*wire.flatten(_skeleton(nest, columns)))
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _Layout(header, metas, header.payload_size)
    return layout


def _skeleton(nest: Any, columns: list[_Column]) -> Any:
    """The nest with meta tensors (shape and dtype, no memory) for leaves, for ``wire``."""
    if isinstance(nest, dict):
        return {name: _skeleton(value, columns) for name, value in nest.items()}
    if isinstance(nest, list):
        return [_skeleton(value, columns) for value in nest]
    column = columns[nest]
    return torch.empty(column.shape, dtype=column.dtype, device="meta")


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _write(memory: memoryview, columns: list[_Column], layout: _Layout) -> None:
    """Stacks each column into its place in ``memory``; zeros the alignment gaps."""
    size = layout.size
    raw = np.frombuffer(memory, np.uint8, size) if size else np.empty(0, np.uint8)
    end = 0
    for column, meta in zip(columns, layout.metas, strict=True):
        raw[end : meta.offset] = 0
        end = meta.offset + meta.nbytes
        if not meta.nbytes:
            continue
        out = torch.from_numpy(raw[meta.offset : end]).view(column.dtype).view(column.shape)
        if column.how == "stack":
            torch.stack(column.values, out=out)
        elif column.how == "numpy":
            torch.stack([torch.as_tensor(value) for value in column.values], out=out)
        else:
            out.copy_(torch.tensor(column.values, dtype=column.dtype))
    raw[end:size] = 0


def gather_into(
    arrays: dict[str, np.ndarray], rows: np.ndarray, as_list: bool, reserve: Reserve
) -> pb.BatchHeader | None:
    """``{name: array[rows]}`` (``as_list``: its values, a list) encoded into ``reserve(size)``.

    The bytes of ``default_collate`` of the rows' items, as tensors, encoded.
    ``rows`` must be in range (checked by the caller). None: not planned here
    (a dtype torch has not, a byte order not native); nothing was reserved.
    """
    names = () if as_list else tuple(arrays)  # a worker serves every dataset: names count
    key = ("gather", names, len(rows), *((a.dtype, a.shape[1:]) for a in arrays.values()))
    layout = _LAYOUTS.get(key)
    if layout is None:
        try:
            fields = [_meta((len(rows), *a.shape[1:]), a.dtype) for a in arrays.values()]
            nest = fields if as_list else dict(zip(arrays, fields, strict=True))
            header, metas = wire.header_for(*wire.flatten(nest))  # leaves in field order
        except (TypeError, ValueError, wire.WireError):
            return None
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _Layout(header, metas, header.payload_size)
    size = layout.size
    raw = np.frombuffer(reserve(size), np.uint8, size) if size else np.empty(0, np.uint8)
    end = 0
    for array, meta in zip(arrays.values(), layout.metas, strict=True):
        raw[end : meta.offset] = 0
        end = meta.offset + meta.nbytes
        if meta.nbytes:
            out = raw[meta.offset : end].view(array.dtype).reshape(len(rows), *array.shape[1:])
            np.take(array, rows, axis=0, out=out, mode="clip")  # "clip": unbuffered
    raw[end:size] = 0
    return layout.header


def _meta(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """A meta tensor (no memory) of ``shape`` and numpy ``dtype``, or an error where torch has none."""
    if not dtype.isnative:
        raise ValueError(f"byte order of {dtype} is not native")
    return torch.empty(shape, dtype=_torch_dtype(dtype), device="meta")


def write_into(
    memory: memoryview, tensors: list[torch.Tensor], metas: list[pb.TensorMeta], size: int
) -> None:
    """Copies built tensors to their offsets in ``memory``; zeros the alignment gaps."""
    raw = np.frombuffer(memory, np.uint8, size)
    end = 0
    for tensor, meta in zip(tensors, metas, strict=True):
        raw[end : meta.offset] = 0
        end = meta.offset + meta.nbytes
        if meta.nbytes:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            torch.from_numpy(raw[meta.offset : end]).copy_(flat)
    raw[end:size] = 0
