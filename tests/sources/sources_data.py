"""Data for the source tests: WebDataset shards and Parquet files, made with the reference libraries."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from batchwire.client import RemoteDataset


def jpeg_bytes(rng: np.random.Generator, size: tuple[int, int] = (12, 16)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_shards(folder: Path, shards: int, per_shard: int, *, seed: int = 0) -> list[Path]:
    """``folder/shard-00000N.tar`` written by ``webdataset.TarWriter``: jpg, cls, npy, json, txt."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = folder / f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                number = shard * per_shard + i
                sink.write(
                    {
                        "__key__": f"sample{number:06d}",
                        "jpg": jpeg_bytes(rng),
                        "cls": int(rng.integers(0, 10)),
                        "npy": rng.standard_normal(3).astype(np.float32),
                        "json": {"n": number},
                        "txt": f"caption {number}",
                    }
                )
        paths.append(path)
    return paths


class ListDataset(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def local_batches(dataset, *, batch_size, shuffle, seed, epoch, rank, world_size, drop_last):
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last))


GRID = list(itertools.product([1, 2], [False, True], [False, True]))
"""(world_size, shuffle, drop_last)."""


def assert_stream_equals_local(
    target: str, name: str, local: Dataset, batch_size: int, epoch: int = 1
):
    from conftest import assert_same_batch

    for world_size, shuffle, drop_last in GRID:
        for rank in range(world_size):
            remote = RemoteDataset(
                target,
                name,
                batch_size=batch_size,
                shuffle=shuffle,
                seed=7,
                drop_last=drop_last,
                rank=rank,
                world_size=world_size,
            )
            remote.set_epoch(epoch)
            expected = local_batches(
                local,
                batch_size=batch_size,
                shuffle=shuffle,
                seed=7,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                drop_last=drop_last,
            )
            actual = list(remote)
            where = f"{name} world {world_size} rank {rank} shuffle {shuffle} drop_last {drop_last}"
            assert len(actual) == len(expected) > 0, where
            for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
                assert_same_batch(a, e, f"{where} batch {i}")


def as_tensors(value: Any) -> Any:
    """numpy → torch, as default_collate would, for comparing single items."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, dict):
        return {k: as_tensors(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(as_tensors(v) for v in value)
    return value


def make_parquet(folder: Path, files: int, rows: int, *, seed: int = 0) -> list[Path]:
    """``folder/part-N.parquet``: fixed-size lists (1-d and 2-d), numbers, a list column,
    PNG bytes and a Hugging Face style image struct ``{bytes, path}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in range(files):
        pngs = []
        for _ in range(rows):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(buffer, "PNG")
            pngs.append(buffer.getvalue())
        x = rng.standard_normal((rows, 4)).astype(np.float32)
        grid = rng.integers(-99, 99, (rows, 2, 3)).astype(np.int16)
        table = pa.table(
            {
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4),
                "grid": pa.FixedSizeListArray.from_arrays(
                    pa.FixedSizeListArray.from_arrays(pa.array(grid.ravel()), 3), 2
                ),
                "label": pa.array(rng.integers(0, 10, rows), pa.int64()),
                "score": pa.array(rng.random(rows).astype(np.float32)),
                "tokens": pa.array(
                    [list(rng.integers(0, 100, 3)) for _ in range(rows)], pa.list_(pa.int32())
                ),
                "png": pa.array(pngs, pa.binary()),
                "hf_image": pa.array(
                    [{"bytes": data, "path": None} for data in pngs],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                ),
            }
        )
        path = folder / f"part-{part}.parquet"
        pq.write_table(table, path, row_group_size=max(1, rows // 3))
        paths.append(path)
    return paths
