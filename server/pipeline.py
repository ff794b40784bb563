"""One served dataset: its source, transforms, collate function and sampler settings.

Built from a ``[datasets.NAME]`` table once in the gRPC process (which also
reads what samplers need: weights, class labels, lengths, subset) and once in
each worker process (which only loads, transforms and collates).

Config keys beside the source's own::

    transforms.image = ["ToTensor", { name = "Normalize", mean = [0.5], std = [0.5] }]
    collate = "default" | "pad" | { kind = "pad", padding_value = 0 } | "pkg.mod:fn"
    [datasets.NAME.sampler]
    kind = "distributed"        # the default of requests that do not choose one
    num_samples = 0             # random/weighted draws per epoch (0: dataset length)
    weights = "weights.npy"     # weighted: one weight per sample ...
    balance = "label"           # ... or inverse class frequency of this field
    without_replacement = false
    indices = "subset.npy"      # subset: the sample indices to serve
    lengths = "lengths.npy"     # dynamic: one length per sample ...
    length_field = "tokens"     # ... or read from this field of each item
    max_tokens = 0              # dynamic budgets (0: unlimited)
    max_items = 0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from batchwire.server.collate import CollateFn, build_collate, describe_collate
from batchwire.server.config import DatasetConfig, Table
from batchwire.server.direct_collate import Reserve
from batchwire.server.samplers import KINDS, balanced_weights
from batchwire.server.sources import MapDataset, build_dataset
from batchwire.server.sources.arrays import map_npy
from batchwire.server.transform_config import ItemTransforms, build_item_transforms
from batchwire.server.transforms import sample_generator
from batchwire.v1 import batchwire_pb2 as pb


@dataclass(frozen=True, eq=False)  # compared by identity: plans are cached per config
class SamplerConfig:
    """A dataset's sampler defaults and the per-sample data its samplers need."""

    kind: str = "distributed"
    num_samples: int = 0
    without_replacement: bool = False
    max_tokens: int = 0
    max_items: int = 0
    weights: np.ndarray | None = None
    subset: np.ndarray | None = None
    lengths: np.ndarray | None = None


class Pipeline:
    """A map-style dataset whose items are already transformed for ``(seed, epoch)``."""

    def __init__(
        self,
        name: str,
        source: MapDataset,
        transforms: ItemTransforms | None,
        collate_fn: CollateFn,
        sampler: SamplerConfig,
    ) -> None:
        self.name = name
        self.source = source
        self.transforms = transforms
        self.collate_fn = collate_fn
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int, *, seed: int = 0, epoch: int = 0) -> Any:
        """Item ``index`` after the transforms, drawing from its ``(seed, epoch, index)`` RNG."""
        item = self.source[index]
        if self.transforms is None:
            return item
        return self.transforms(item, sample_generator(seed, epoch, index))

    def load_many(self, indices: list[int], *, seed: int = 0, epoch: int = 0) -> list[Any]:
        """Items ``indices`` after the transforms: ``load`` of each, in one call to the source.

        A source with ``__getitems__`` gets one call per batch, as DataLoader's
        fetcher makes it; the transforms still run item by item, each with its
        own ``(seed, epoch, index)`` RNG: the same items as ``load``.
        """
        if self.transforms is None:
            return get_items(self.source, indices)
        if not getattr(self.source, "__getitems__", None):
            # Item by item, each transformed as it is loaded: the order load() had.
            return [self.load(index, seed=seed, epoch=epoch) for index in indices]
        items = get_items(self.source, indices)
        transforms = self.transforms
        return [
            transforms(item, sample_generator(seed, epoch, index))
            for item, index in zip(items, indices, strict=True)
        ]

    def load_batch(self, indices: Sequence[int]) -> Any | None:
        """The collated batch of ``indices`` in one call, where the source can build it so.

        A source with ``load_batch`` (synthetic, arrays) gathers a whole batch with
        one array operation instead of a ``__getitem__`` per sample and a
        ``default_collate``; only without transforms and with the default collate,
        where the result is the same. ``None``: load sample by sample.
        """
        batched = self._source_batch("load_batch")
        return batched(indices) if batched is not None else None

    def load_batch_into(self, indices: Sequence[int], reserve: Reserve) -> pb.BatchHeader | None:
        """``load_batch``, encoded straight into ``reserve(size)`` (the payload's memory) where
        the source can (``arrays``: ``direct_collate.gather_into``); None: it cannot."""
        batched = self._source_batch("load_batch_into")
        return batched(indices, reserve) if batched is not None else None

    def _source_batch(self, name: str) -> Any:
        """The source's one-call batch method ``name``, where its result is what the
        per-sample path gives (no transforms, the default collate); else None."""
        if self.transforms is not None or self.collate_fn is not default_collate:
            return None
        return getattr(self.source, name, None)

    def __getitem__(self, index: int) -> Any:
        return self.load(index)

    def describe_transforms(self) -> list[str]:
        lines = self.transforms.describe() if self.transforms is not None else []
        return [*lines, f"collate: {describe_collate(self.collate_fn)}"]


def get_items(source: Any, indices: list[int]) -> list[Any]:
    """``[source[i] for i in indices]``, in one ``source.__getitems__(indices)`` where it has one.

    That is PyTorch's batched-fetch protocol (DataLoader calls it since torch
    2.0): a dataset that reads a batch at once (a database, a file of rows, a
    Hugging Face dataset) defines it.
    """
    getitems = getattr(source, "__getitems__", None)
    if not getitems:
        return [source[index] for index in indices]
    items = getitems(indices)
    if len(items) != len(indices):
        raise ValueError(f"__getitems__ returned {len(items)} items for {len(indices)} indices")
    return list(items)


def build_pipeline(dataset: DatasetConfig, file: Any, *, for_sampling: bool = True) -> Pipeline:
    """Builds a dataset's pipeline; raises ``ConfigError`` naming the key that is wrong.

    ``for_sampling=False`` (workers) skips reading weights, labels and lengths.
    """
    source = build_dataset(dataset, file)
    table = Table(dataset.pipeline, file=Path(file), prefix=f"datasets.{dataset.name}")
    field_names = tuple(getattr(source, "field_names", ()))
    transforms = build_item_transforms(table, "transforms", field_names)
    collate_fn = build_collate(table, "collate", field_names)
    sampler_table = table.table("sampler", {})
    sampler = (
        build_sampler_config(sampler_table, source, field_names)
        if for_sampling
        else SamplerConfig(kind=sampler_table.data.get("kind", "distributed"))
    )
    return Pipeline(dataset.name, source, transforms, collate_fn, sampler)


_SAMPLER_KEYS = {
    "kind",
    "num_samples",
    "without_replacement",
    "weights",
    "balance",
    "indices",
    "lengths",
    "length_field",
    "max_tokens",
    "max_items",
}


def build_sampler_config(
    table: Table, source: MapDataset, field_names: Sequence[str]
) -> SamplerConfig:
    table.reject_unknown(_SAMPLER_KEYS)
    length = len(source)
    kind = table.choice("kind", list(KINDS), "distributed")
    weights = _weights(table, source, field_names, length)
    subset = None
    if "indices" in table.data:
        subset = _array_file(table, "indices").astype(np.int64)
        if subset.ndim != 1 or (len(subset) and not (subset.min() >= 0 and subset.max() < length)):
            raise table.error("indices", f"expected a 1-D array of indices in [0, {length})")
    lengths = _lengths(table, source, field_names, length)
    max_tokens = table.get("max_tokens", int, 0)
    max_items = table.get("max_items", int, 0)
    for name, value in (("max_tokens", max_tokens), ("max_items", max_items)):
        if value < 0:
            raise table.error(name, f"expected a non-negative integer, got {value}")
    num_samples = table.get("num_samples", int, 0)
    if num_samples < 0:
        raise table.error("num_samples", f"expected a non-negative integer, got {num_samples}")
    needs = {
        "weighted": (weights, "weights = FILE or balance = FIELD"),
        "subset": (subset, "indices = FILE"),
        "dynamic": (lengths, "lengths = FILE or length_field = FIELD"),
    }
    if kind in needs and needs[kind][0] is None:
        raise table.error("kind", f"the {kind!r} sampler needs {needs[kind][1]}")
    return SamplerConfig(
        kind=kind,
        num_samples=num_samples,
        without_replacement=table.get("without_replacement", bool, False),
        max_tokens=max_tokens,
        max_items=max_items,
        weights=weights,
        subset=subset,
        lengths=lengths,
    )


def _array_file(table: Table, name: str) -> np.ndarray:
    """A .npy file or a text file of numbers (one or more per line)."""
    path = table.path(name)
    try:
        if path.suffix == ".npy":
            return map_npy(path)
        return np.loadtxt(path, ndmin=1)
    except (ValueError, OSError) as exc:
        raise table.error(name, f"cannot read {path}: {exc}") from None


def _weights(
    table: Table, source: MapDataset, field_names: Sequence[str], length: int
) -> np.ndarray | None:
    if "weights" in table.data and "balance" in table.data:
        raise table.error("balance", "give weights or balance, not both")
    if "weights" in table.data:
        weights = np.asarray(_array_file(table, "weights"), dtype=np.float64)
        if weights.shape != (length,):
            raise table.error(
                "weights", f"expected {length} weights (one per sample), got shape {weights.shape}"
            )
        if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
            raise table.error("weights", "weights must be finite, non-negative, not all zero")
        return weights
    if "balance" in table.data:
        field = table.get("balance", str)
        try:
            labels = field_values(source, field, field_names)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise table.error("balance", f"cannot read field {field!r}: {exc}") from None
        return balanced_weights(labels)
    return None


def _lengths(
    table: Table, source: MapDataset, field_names: Sequence[str], length: int
) -> np.ndarray | None:
    if "lengths" in table.data and "length_field" in table.data:
        raise table.error("length_field", "give lengths or length_field, not both")
    if "lengths" in table.data:
        lengths = np.asarray(_array_file(table, "lengths"), dtype=np.int64)
        if lengths.shape != (length,) or (lengths < 0).any():
            raise table.error(
                "lengths", f"expected {length} non-negative lengths, got shape {lengths.shape}"
            )
        return lengths
    if "length_field" in table.data:
        field = table.get("length_field", str)
        try:
            return field_values(source, field, field_names, as_length=True)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise table.error("length_field", f"cannot read field {field!r}: {exc}") from None
    return None


def field_values(
    source: MapDataset, field: str, field_names: Sequence[str], *, as_length: bool = False
) -> np.ndarray:
    """One value per sample of ``field``: from the source's arrays if it has them, else item by item.

    With ``as_length``, an array-valued field gives its first dimension (a
    sequence's length) and a scalar field is taken as the length itself.
    """
    fast = getattr(source, "field_array", None)
    array = fast(field) if fast is not None else None
    if array is not None and (array.ndim == 1 or not as_length):
        return np.asarray(array, dtype=np.int64)
    values = np.empty(len(source), dtype=np.int64)
    for index in range(len(source)):
        value = _field(source[index], field, field_names)
        if as_length and _has_dim(value):
            values[index] = len(value)
        else:
            values[index] = int(torch.as_tensor(value).item())
    return values


def _has_dim(value: Any) -> bool:
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.ndim >= 1
    return isinstance(value, Sequence) and not isinstance(value, str)


def _field(item: Any, field: str, field_names: Sequence[str]) -> Any:
    if isinstance(item, Mapping):
        return item[field]
    if isinstance(item, tuple | list):
        if field in field_names:
            return item[field_names.index(field)]
        if field.isdigit():
            return item[int(field)]
        raise KeyError(f"items are tuples of {len(item)}; name a position like '1'")
    raise TypeError(f"items are {type(item).__name__}, not dicts or tuples")
