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
"""

from __future__ import annotations

import operator
from collections.abc import Callable
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


def collate_into(samples: list[Any], reserve: Reserve) -> pb.BatchHeader | None:
    """``default_collate(samples)`` encoded into ``reserve(size)``; None: not planned here.

    On None, nothing or only part of the reserved memory was written: the
    caller writes the batch there again by the general path.
    """
    columns: list[tuple[str, list[Any]]] = []
    try:
        skeleton = _plan(samples, columns)
        tensors, structure = wire.flatten(skeleton)
        metas, size = wire.layout(tensors)
    except (_NotPlain, wire.WireError, KeyError, TypeError):
        return None  # KeyError: an item lacks a key; TypeError: a dtype torch has not
    header = pb.BatchHeader(
        payload_size=size,
        raw_size=size,
        tensors=metas,
        structure=structure,
        num_samples=int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0,
    )
    try:
        _write(reserve(size), columns, tensors, metas, size)
    except (RuntimeError, TypeError, ValueError, OverflowError):
        return None  # e.g. an int beyond int64: default_collate says so on the general path
    return header


def _plan(samples: list[Any], columns: list[tuple[str, list[Any]]]) -> Any:
    """The collated batch's nest with meta tensors (shape and dtype only) as leaves.

    Appends each leaf's column (how to write it, the samples' values) in the
    order ``wire.flatten`` visits leaves: dicts in key order, lists by position.
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
        columns.append(("stack", samples))
        return torch.empty((len(samples), *first.shape), dtype=first.dtype, device="meta")
    if kind is np.ndarray:
        shape, dtype = first.shape, first.dtype
        if dtype.kind not in _NUMPY_KINDS or not dtype.isnative:
            raise _NotPlain
        if any(sample.shape != shape or sample.dtype != dtype for sample in samples):
            raise _NotPlain
        columns.append(("numpy", samples))
        return torch.empty((len(samples), *shape), dtype=_torch_dtype(dtype), device="meta")
    if kind in _NUMBER_DTYPES:
        columns.append(("number", samples))
        return torch.empty(len(samples), dtype=_NUMBER_DTYPES[kind], device="meta")
    if kind is dict:
        return {key: _plan([sample[key] for sample in samples], columns) for key in first}
    if kind is tuple or kind is list:  # default_collate gives a list for both
        if any(len(sample) != len(first) for sample in samples):
            raise _NotPlain  # default_collate's own error says which
        return [_plan(list(column), columns) for column in zip(*samples, strict=True)]
    raise _NotPlain


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _write(
    memory: memoryview,
    columns: list[tuple[str, list[Any]]],
    tensors: list[torch.Tensor],
    metas: list[pb.TensorMeta],
    size: int,
) -> None:
    """Stacks each column into its place in ``memory``; zeros the alignment gaps."""
    raw = np.frombuffer(memory, np.uint8, size) if size else np.empty(0, np.uint8)
    end = 0
    for (how, values), tensor, meta in zip(columns, tensors, metas, strict=True):
        raw[end : meta.offset] = 0
        end = meta.offset + meta.nbytes
        if not meta.nbytes:
            continue
        out = torch.from_numpy(raw[meta.offset : end]).view(tensor.dtype).view(tensor.shape)
        if how == "stack":
            torch.stack(values, out=out)
        elif how == "numpy":
            torch.stack([torch.as_tensor(value) for value in values], out=out)
        else:
            out.copy_(torch.tensor(values, dtype=tensor.dtype))
    raw[end:size] = 0
