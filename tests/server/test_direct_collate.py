"""Collating straight into payload memory: the bytes of default_collate + encode, or no plan."""

from __future__ import annotations

import collections
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from batchwire import wire
from batchwire.server._fastpath import KeptFiles, write_payload_file
from batchwire.server.batches import build_and_write, encode_batch
from batchwire.server.collate import PadCollate
from batchwire.server.direct_collate import collate_into, gather_into
from batchwire.server.sources.arrays import ArrayDataset
from batchwire.v1 import batchwire_pb2 as pb


def _general(samples: list) -> tuple[pb.BatchHeader, bytes]:
    """Today's path: default_collate, then the tensors copied into a zeroed payload."""
    header, tensors = encode_batch(default_collate(samples), "demo")
    payload = bytearray(header.payload_size)
    wire.write_payload(tensors, list(header.tensors), memoryview(payload))
    return header, bytes(payload)


def _direct(samples: list) -> tuple[pb.BatchHeader | None, bytes]:
    memory = bytearray()

    def reserve(size: int) -> memoryview:
        memory[:] = b"\xff" * size  # a recycled file: stale bytes everywhere
        return memoryview(memory)

    return collate_into(samples, reserve), bytes(memory)


def _item(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "image": torch.randint(0, 256, (3, 5, 7), generator=g, dtype=torch.uint8),  # 105 B: gaps
        "label": torch.tensor(i % 10),  # 0-d
        "pair": (torch.randn(2, generator=g, dtype=torch.bfloat16), [i, float(i) / 3]),
        "mask": torch.tensor([True, i % 2 == 0]),
        "array": np.arange(4, dtype=np.float32) * i,
        "scalar_array": np.array(i, dtype=np.int16),
        "empty": torch.empty(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t()[i % 4],  # a non-contiguous view
    }


PLANNED = {
    "dict of every kind of leaf": [_item(i) for i in range(5)],
    "tuples become lists": [(torch.full((2,), i), i) for i in range(3)],
    "lists": [[torch.full((1, 2), float(i)), {"x": i}] for i in range(4)],
    "bare tensors": [torch.full((4,), i, dtype=torch.int32) for i in range(3)],
    "python floats": [0.5, 1.25, -3.0],
}


@pytest.mark.parametrize("name", list(PLANNED))
def test_planned_batches_are_byte_identical_to_default_collate(name: str) -> None:
    samples = PLANNED[name]
    expected_header, expected = _general(samples)
    header, payload = _direct(samples)
    assert header is not None, f"{name}: not planned"
    assert header == expected_header
    assert payload == expected  # gaps zeroed over the stale bytes


Point = collections.namedtuple("Point", "x y")

UNPLANNED = {
    "ragged": [torch.zeros(2), torch.zeros(3)],
    "mixed dtypes": [torch.zeros(2), torch.zeros(2, dtype=torch.float64)],
    "mixed number types": [1, 2.0],
    "bools": [True, False],
    "strings": [{"name": "a"}, {"name": "b"}],
    "namedtuples": [Point(1, 2), Point(3, 4)],
    "a Parameter": [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))],
    "needs grad": [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)],
    "numpy scalars": [np.float32(1), np.float32(2)],
    "a dtype that cannot travel": [np.zeros(2, np.uint16), np.zeros(2, np.uint16)],
    "an int beyond int64": [1, 1 << 70],
    "a missing key": [{"a": 1, "b": 2}, {"a": 3}],
    "no samples": [],
}


@pytest.mark.parametrize("name", list(UNPLANNED))
def test_anything_else_takes_the_general_path(name: str) -> None:
    assert _direct(UNPLANNED[name])[0] is None


def _task(start: int) -> list[list[int]]:
    return [[start + 8 * b + i for i in range(8)] for b in range(3)] + [[start + 24, start + 25]]


class _Items:
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> dict:
        return _item(index)


def _old_task_bytes(tmp_path: Path, batches: list[list[int]]) -> bytes:
    """The payload file the pwrite path writes for ``batches``, offsets as build_and_write's."""
    out, end = bytearray(), 0
    for indices in batches:
        header, tensors = encode_batch(default_collate([_item(i) for i in indices]), "demo")
        path = tmp_path / "old"
        write_payload_file(str(path), tensors, list(header.tensors), header.payload_size)
        base = wire.aligned(end)
        out += bytes(base - end) + path.read_bytes()
        end = base + header.payload_size
    return bytes(out)


def test_kept_files_are_written_in_place_task_after_task(tmp_path: Path) -> None:
    kept = KeptFiles()
    path = tmp_path / "task"
    path.write_bytes(b"\xff" * 50_000)  # a recycled file, longer than any of these tasks
    # Shorter by a little (its tail is zeroed), by a lot (it is cut), longer again.
    for start, batches in [
        (0, _task(0)),
        (100, _task(100)[:3]),
        (200, _task(200)[:1]),
        (300, _task(300)),
    ]:
        written = build_and_write(_Items(), "demo", batches, str(path), kept=kept)
        assert written.error is None and len(written.headers) == len(batches)
        content = path.read_bytes()
        assert content[: written.size] == _old_task_bytes(tmp_path, batches), start
        assert content[written.size :] == bytes(len(content) - written.size)  # no old bytes
    kept.release()


def test_a_kept_file_that_was_removed_is_not_written_for_its_name(tmp_path: Path) -> None:
    kept = KeptFiles()
    path = tmp_path / "task"
    build_and_write(_Items(), "demo", _task(0), str(path), kept=kept)
    os.unlink(path)  # the pool removed it; a later task may get a file of the same name
    written = build_and_write(_Items(), "demo", _task(0), str(path), kept=kept)
    assert path.read_bytes()[: written.size] == _old_task_bytes(tmp_path, _task(0))
    kept.sweep()
    kept.release()


def _two_workers_take_turns(path: str, sizes: list[int]) -> None:
    workers = [KeptFiles(), KeptFiles()]  # each worker keeps its own mappings
    for turn, size in enumerate(sizes):
        batches = _task(0)[:size]
        written = build_and_write(_Items(), "demo", batches, path, kept=workers[turn % 2])
        assert written.error is None and len(written.headers) == size


def test_a_file_another_worker_cut_shorter_is_grown_before_it_is_written(tmp_path: Path) -> None:
    # Worker A maps the file at 4 batches, B cuts it to 1, A writes 4 again: without
    # re-reading the file's length, A wrote past its end (SIGBUS; in a child here).
    path = str(tmp_path / "task")
    child = multiprocessing.get_context("fork").Process(
        target=_two_workers_take_turns, args=(path, [4, 1, 4, 1])
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    expected = _old_task_bytes(tmp_path, _task(0)[:1])
    assert Path(path).read_bytes()[: len(expected)] == expected


def test_batches_of_one_structure_but_other_shapes_or_dtypes_get_their_own_header() -> None:
    # Headers are reused by make-up (structure, dtypes, shapes): any change must show.
    makeups = [
        [{"x": torch.zeros(3), "y": 1} for _ in range(4)],
        [{"x": torch.zeros(3), "y": 1} for _ in range(5)],  # another batch size
        [{"x": torch.zeros(2), "y": 1} for _ in range(4)],  # another shape
        [{"x": torch.zeros(3, dtype=torch.float16), "y": 1} for _ in range(4)],
        [{"x": torch.zeros(3), "y": 1.0} for _ in range(4)],  # a float, not an int
        [{"y": 1, "x": torch.zeros(3)} for _ in range(4)],  # another key order
        [{"x": [torch.zeros(3)], "y": 1} for _ in range(4)],  # one level deeper
    ]
    for _ in range(2):
        for samples in makeups:
            assert _direct(samples) == _general(samples)


class _Ragged:
    """Items of varying length, collated by padding: not planned, so built, then copied."""

    collate_fn = staticmethod(PadCollate(None, {}, -1.0))

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> dict:
        return {"tokens": torch.arange(index % 5 + 1, dtype=torch.int16), "label": index}


class _Gathered(_Items):
    """A source-level gather (``load_batch``, as the synthetic and arrays sources have)."""

    def load_batch(self, indices: list[int]) -> dict:
        return default_collate([_item(i) for i in indices])


@pytest.mark.parametrize("dataset", [_Ragged(), _Gathered()], ids=["custom collate", "gather"])
def test_batches_built_another_way_are_copied_into_the_kept_file(dataset, tmp_path: Path) -> None:
    path = tmp_path / "task"
    path.write_bytes(b"\xff" * 20_000)
    written = build_and_write(dataset, "demo", _task(0), str(path), kept=KeptFiles())
    assert written.error is None and len(written.headers) == 4
    expected, end = bytearray(), 0
    for indices in _task(0):
        if isinstance(dataset, _Gathered):
            batch = dataset.load_batch(indices)
        else:
            batch = dataset.collate_fn([dataset[i] for i in indices])
        header, payload = _encoded(batch)
        base = wire.aligned(end)
        expected += bytes(base - end) + payload
        end = base + header.payload_size
    assert path.read_bytes()[:end] == bytes(expected)
    assert written.size == end


def _encoded(batch) -> tuple[pb.BatchHeader, bytes]:
    header, tensors = encode_batch(batch, "demo")
    payload = bytearray(header.payload_size)
    wire.write_payload(tensors, list(header.tensors), memoryview(payload))
    return header, bytes(payload)


def _arrays(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        "image": rng.integers(0, 256, (n, 3, 5, 7), dtype=np.uint8),  # 105 B a row: gaps
        "label": np.arange(n, dtype=np.int64) % 10,  # a row is 0-d
        "half": rng.random((n, 3)).astype(np.float16),
        "mask": rng.random((n, 2)) > 0.5,
        "empty": np.zeros((n, 0), np.float32),
    }


@pytest.mark.parametrize("item", ["dict", "tuple"])
def test_an_arrays_gather_is_byte_identical_to_its_batch_encoded(item: str) -> None:
    dataset = ArrayDataset(_arrays(40), item)
    memory = bytearray()

    def reserve(size: int) -> memoryview:
        memory[:] = b"\xff" * size  # a recycled file: stale bytes everywhere
        return memoryview(memory)

    for indices in ([3, 1, 39, 3, 0], [7], list(range(40))):
        header = dataset.load_batch_into(indices, reserve)
        expected_header, expected = _encoded(dataset.load_batch(indices))
        assert header == expected_header
        assert bytes(memory) == expected


def test_datasets_gathered_by_one_worker_keep_their_own_field_names() -> None:
    # One worker serves every dataset: a layout cached for one must not name another's fields.
    memory = bytearray(1 << 12)
    rows = np.arange(3)
    first = gather_into(
        {"image": np.zeros((4, 2)), "label": np.zeros(4)}, rows, False, lambda size: memory
    )
    second = gather_into(
        {"x": np.zeros((4, 2)), "y": np.zeros(4)}, rows, False, lambda size: memory
    )
    assert first is not None and second is not None
    assert list(first.structure.map.keys) == ["image", "label"]
    assert list(second.structure.map.keys) == ["x", "y"]


@pytest.mark.parametrize(
    "array",
    [np.zeros((4, 2), np.uint16), np.zeros((4, 2), ">f4")],
    ids=["a dtype that cannot travel", "big-endian"],
)
def test_an_arrays_gather_of_anything_else_is_not_planned(array: np.ndarray) -> None:
    reserved = []
    header = gather_into({"x": array}, np.arange(2), False, reserved.append)
    assert header is None and not reserved


def test_workers_gather_array_rows_straight_into_the_payload(tmp_path: Path, monkeypatch) -> None:
    dataset = ArrayDataset(_arrays(64), "dict")
    batches = [[5, 9, 9, 60], list(range(0, 64, 3)), [63]]
    expected, end = bytearray(), 0
    for indices in batches:
        header, payload = _encoded(dataset.load_batch(indices))
        base = wire.aligned(end)
        expected += bytes(base - end) + payload
        end = base + header.payload_size

    def no_load_batch(self, indices):
        raise AssertionError("gathered into a tensor, then copied")

    monkeypatch.setattr(ArrayDataset, "load_batch", no_load_batch)
    path = tmp_path / "task"
    path.write_bytes(b"\xff" * 20_000)
    written = build_and_write(dataset, "demo", batches, str(path), kept=KeptFiles())
    assert written.error is None and len(written.headers) == 3
    assert path.read_bytes()[:end] == bytes(expected)
