"""Data and helpers shared by the pipeline tests: generated images, configs, raw streams."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from batchwire.client import BatchClient
from batchwire.server.transforms import sample_generator
from batchwire.v1 import batchwire_pb2 as pb


def make_image_folder(
    root: Path, counts: dict[str, int], *, size: tuple[int, int] = (20, 24), ext: str = ".jpg"
) -> Path:
    """``root/CLASS/NNN.jpg`` with random content; ``size`` is (height, width)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}{ext}")
    return root


def stream(target: str, dataset: str, **fields: Any) -> list[tuple[int, Any]]:
    """One StreamBatches call: ``(batch_index, batch)`` pairs (``sampler`` may be a dict)."""
    return list(BatchClient(target).batches(request(dataset, **fields)))


def request(dataset: str, **fields: Any) -> pb.StreamBatchesRequest:
    sampler = fields.pop("sampler", None)
    return pb.StreamBatchesRequest(
        dataset=dataset,
        world_size=fields.pop("world_size", 1),
        sampler=pb.SamplerSpec(**sampler) if sampler else None,
        **fields,
    )


def count(target: str, dataset: str, **fields: Any) -> pb.BatchCount:
    """The CountBatches RPC, through the generated stub."""
    import grpc

    from batchwire.v1 import batchwire_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = batchwire_pb2_grpc.BatchServiceStub(channel)
        return stub.CountBatches(request(dataset, **fields), timeout=30)


def batches(target: str, dataset: str, **fields: Any) -> list[Any]:
    return [batch for _, batch in stream(target, dataset, **fields)]


class SeededDataset(Dataset):
    """The local twin of a served pipeline: ``transform(item, sample_generator(seed, epoch, i))``."""

    def __init__(self, source: Any, transform: Any, *, seed: int, epoch: int) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        return self.transform(self.source[index], sample_generator(self.seed, self.epoch, index))


def worker_pids(server_pid: int) -> list[int]:
    """The server's batch workers: children of its forkserver (a child of the server)."""
    pids = []
    for child in _children(server_pid):
        if b"forkserver" in _cmdline(child):
            pids.extend(_children(child))
    return sorted(pids)


def _children(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        children.extend(int(p) for p in text.split())
    return children


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def tensor_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


class SlowRange(Dataset):
    """Item i is ``tensor([i, i * i])``, after ``delay`` seconds (keeps workers busy)."""

    def __init__(self, length: int, delay: float) -> None:
        self.length = length
        self.delay = delay

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return torch.tensor([index, index * index])


def slow_range(length: int = 40, delay: float = 0.01) -> SlowRange:
    return SlowRange(length, delay)


def reject_seven(value: torch.Tensor) -> torch.Tensor:
    """A transform (by import path) that raises on one value."""
    if int(value[0]) == 7:
        raise ValueError("seven is not allowed")
    return value


def add_noise(value: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """A random transform (by import path) that draws from batchwire's per-sample RNG."""
    return value.to(torch.float32) + torch.rand(value.shape, generator=generator)


def sum_collate(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collate function (by import path)."""
    stacked = torch.stack(samples)
    return {"stacked": stacked, "total": stacked.sum(0)}


class VariableSequences(Dataset):
    """Item i: ``{"tokens": [i, i, ...] of length (7 * i) % 13 + 1, "label": i}``."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def size(index: int) -> int:
        return (7 * index) % 13 + 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return {"tokens": torch.full((self.size(index),), index), "label": index}


def variable_sequences(length: int = 50) -> VariableSequences:
    return VariableSequences(length)


def scale_by(factor: float):
    """A transform factory (by import path, with kwargs)."""
    return lambda value: value * factor
