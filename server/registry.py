"""The datasets a server serves, built once in the gRPC process for lengths and descriptions."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from batchwire import wire
from batchwire.server.config import Config
from batchwire.server.fingerprint import dataset_fingerprint
from batchwire.server.pipeline import Pipeline, build_pipeline
from batchwire.server.requests import PLANS
from batchwire.v1 import batchwire_pb2 as pb


class DescribeError(RuntimeError):
    """A dataset whose first item cannot be loaded or sent."""


@dataclass
class DatasetEntry:
    name: str
    source: str
    dataset: Pipeline
    length: int
    fingerprint: str = ""  # see fingerprint.py
    _info: pb.DatasetInfo | None = field(default=None, repr=False)

    def info(self) -> pb.DatasetInfo:
        """Length and per-sample fields, read off item 0 as the dataset's collate function makes it."""
        if self._info is None:
            fields: list[pb.FieldInfo] = []
            if self.length:
                try:
                    batch: Any = self.dataset.collate_fn(self.dataset.load_many([0]))
                    tensors, structure = wire.flatten(batch)
                except Exception as exc:
                    raise DescribeError(
                        f"dataset {self.name!r}, sample index 0: {type(exc).__name__}: {exc}"
                    ) from exc
                fields = wire.field_infos(structure, tensors)
                for info in fields:
                    del info.shape[0]  # the batch dimension of the one-item batch
            sampler = self.dataset.sampler
            self._info = pb.DatasetInfo(
                name=self.name,
                length=self.length,
                fields=fields,
                source=self.source,
                transforms=self.dataset.describe_transforms(),
                sampler=pb.SamplerSpec(
                    kind=sampler.kind,
                    num_samples=sampler.num_samples,
                    without_replacement=sampler.without_replacement,
                    max_tokens=sampler.max_tokens,
                    max_items=sampler.max_items,
                ),
                fingerprint=self.fingerprint,
            )
        return self._info

    def sample_bytes(self) -> int | None:
        """Payload bytes of one sample, from item 0 (None when it cannot be read)."""
        try:
            fields = self.info().fields
        except DescribeError:
            return None
        return sum(math.prod(info.shape) * wire.torch_dtype(info.dtype).itemsize for info in fields)


class DatasetRegistry:
    """Builds every dataset of a config; raises ``ConfigError`` for the first that fails."""

    def __init__(self, config: Config) -> None:
        add_python_path(config.server.python_path)
        PLANS.resize(config.server.plan_cache_bytes)  # one budget for the server's plans
        self.entries: dict[str, DatasetEntry] = {}
        for name, dataset_config in config.datasets.items():
            dataset = build_pipeline(dataset_config, config.file)
            length = len(dataset)
            self.entries[name] = DatasetEntry(
                name,
                dataset_config.source,
                dataset,
                length,
                dataset_fingerprint(dataset_config, length),
            )

    def get(self, name: str) -> DatasetEntry | None:
        return self.entries.get(name)

    def names(self) -> list[str]:
        return sorted(self.entries)


def add_python_path(folders: tuple[str, ...]) -> None:
    for folder in folders:
        if folder not in sys.path:
            sys.path.insert(0, folder)
