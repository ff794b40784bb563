"""Dataset sources: each turns a ``[datasets.NAME]`` table into a map-style dataset.

A source is a function ``build(table) -> Dataset`` that checks its keys through
``Table`` (so that a bad key fails at start-up, naming file and key) and
returns an object with ``__len__`` and ``__getitem__``. The server calls it
once in the gRPC process (for lengths and descriptions) and once in each
worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from batchwire.server.config import ConfigError, DatasetConfig, Table
from batchwire.server.sources import (
    arrays,
    hf_dataset,
    image_folder,
    parquet,
    python,
    synthetic,
    timeseries,
    webdataset,
)


class MapDataset(Protocol):
    """What every source returns: torch's map-style Dataset protocol."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


SourceBuilder = Callable[[Table], MapDataset]

SOURCES: dict[str, SourceBuilder] = {
    "arrays": arrays.build,
    "hf_dataset": hf_dataset.build,
    "image_folder": image_folder.build,
    "parquet": parquet.build,
    "python": python.build,
    "synthetic": synthetic.build,
    "timeseries": timeseries.build,
    "webdataset": webdataset.build,
}


def build_dataset(dataset: DatasetConfig, file: Any) -> MapDataset:
    """Builds the dataset a config table declares; raises ``ConfigError`` if it cannot."""
    key = f"datasets.{dataset.name}"
    builder = SOURCES.get(dataset.source)
    if builder is None:
        raise ConfigError(
            file,
            f"{key}.source",
            f"unknown source {dataset.source!r}; expected one of {', '.join(sorted(SOURCES))}",
        )
    source = builder(Table(dataset.options, file=file, prefix=key))
    try:
        len(source)  # the registry and samplers rely on it: a failure is named here
    except Exception as exc:  # raised by __len__, or TypeError/ValueError: not an int >= 0
        raise ConfigError(
            file, key, f"len() of the dataset failed: {type(exc).__name__}: {exc}"
        ) from None
    return source


__all__ = ["SOURCES", "MapDataset", "build_dataset"]
