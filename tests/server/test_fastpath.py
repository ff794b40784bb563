"""The worker's fast path: payload files byte-identical to the mmap layout; no batch kept alive."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import torch

from batchwire import wire
from batchwire.server._fastpath import (
    release_freed_memory,
    reuse_freed_memory,
    write_payload_file,
)
from batchwire.server._payloads import PayloadFiles
from batchwire.server.batches import build_and_write, write_batch
from batchwire.v1 import batchwire_pb2 as pb


def _batch() -> dict:
    return {
        "image": torch.arange(3 * 5 * 7, dtype=torch.uint8).reshape(3, 5, 7),  # 105 B: a gap
        "empty": torch.empty(0, 4),
        "mask": torch.tensor([True, False, True]),
        "score": torch.linspace(0, 1, 5, dtype=torch.bfloat16),
    }


def test_payload_file_equals_the_mmap_layout(tmp_path: Path) -> None:
    tensors, _ = wire.flatten(_batch())
    metas, size = wire.layout(tensors)
    expected = bytearray(size)
    wire.write_payload(tensors, metas, memoryview(expected))
    path = tmp_path / "payload"
    write_payload_file(str(path), tensors, metas, size)
    assert path.read_bytes() == bytes(expected)  # alignment gaps read as zeros


def test_write_then_open_decodes_the_batch(tmp_path: Path) -> None:
    batch = _batch()
    path = str(tmp_path / "batch")
    header, size = write_batch(batch, "demo", path)
    payload = PayloadFiles(str(tmp_path), object()).open(path, size)
    decoded = wire.unflatten(header.structure, wire.decode_tensors(header, payload))
    for key, tensor in batch.items():
        assert decoded[key].dtype == tensor.dtype and torch.equal(decoded[key], tensor), key


def test_flatten_does_not_keep_the_batch_alive() -> None:
    gc.disable()  # what matters is that no cycle needs the collector
    try:
        tensor = torch.zeros(1000)
        ref = weakref.ref(tensor)
        wire.flatten({"x": tensor})
        del tensor
        assert ref() is None
    finally:
        gc.enable()


def test_memory_hints_are_safe_to_call() -> None:
    reuse_freed_memory()
    block = torch.empty(8 << 20, dtype=torch.uint8)
    del block
    release_freed_memory()  # must not raise, glibc or not


class _Items:
    """Item i is ``{"x": [i, i, i]}``; item 13 raises."""

    def __len__(self) -> int:
        return 100

    def __getitem__(self, index: int) -> dict:
        if index == 13:
            raise ValueError("unlucky")
        return {"x": torch.full((3,), index, dtype=torch.int32)}


def test_batches_of_one_task_share_a_file_and_stop_at_the_first_failure(tmp_path: Path) -> None:
    path = str(tmp_path / "task")
    written = build_and_write(_Items(), "items", [[1, 2], [3], [12, 13], [4]], path)
    assert len(written.headers) == 2 and written.error is not None
    assert "sample index 13" in written.error and "unlucky" in written.error
    payload = PayloadFiles(str(tmp_path), object()).open(path, written.size)
    decoded = []
    for header_bytes, offset in zip(written.headers, written.offsets, strict=True):
        header = pb.BatchHeader.FromString(header_bytes)
        assert offset % wire.ALIGNMENT == 0
        view = payload[offset : offset + header.payload_size]
        decoded.append(wire.unflatten(header.structure, wire.decode_tensors(header, view))["x"])
    assert [batch[:, 0].tolist() for batch in decoded] == [[1, 2], [3]]


def test_payload_files_are_reused_only_once_unmapped(tmp_path: Path) -> None:
    files = PayloadFiles(str(tmp_path), object())
    first = files.take()
    Path(first).write_bytes(b"a" * 100)
    view = files.open(first, 100)
    piece = view[10:20]
    del view
    assert files.take() != first  # a slice still maps it
    del piece
    gc.collect()  # not needed under CPython's refcounting; keeps the test honest elsewhere
    assert files.take() == first  # unmapped: the next task writes over it
    assert os.path.exists(first)


def test_free_payload_files_are_trimmed_and_capped(tmp_path: Path, monkeypatch) -> None:
    from batchwire.server import _payloads

    monkeypatch.setattr(_payloads, "RECYCLE_BYTES", 150)
    files = PayloadFiles(str(tmp_path), object())
    paths = [files.take() for _ in range(3)]
    for path in paths:
        Path(path).write_bytes(b"b" * 100)
        files.open(path, 100)  # the view is dropped at once: recycled, or removed over the cap
    assert files.take() == paths[0]  # the first fits the cap; the others were removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(paths[0]).name]
    Path(paths[0]).write_bytes(b"b" * 100)
    files.open(paths[0], 100)
    files.trim()
    assert list(tmp_path.iterdir()) == []
    files.close()
    unmapped = files.take()
    Path(unmapped).write_bytes(b"c" * 10)
    files.open(unmapped, 10)
    assert files.take() != unmapped
    assert list(tmp_path.iterdir()) == []  # a closed pool removes instead of recycling


def test_a_recycled_file_carries_no_bytes_of_its_last_payload(tmp_path: Path) -> None:
    path = tmp_path / "recycled"
    path.write_bytes(b"\xff" * 4096)  # what the file held before
    tensors, _ = wire.flatten(_batch())  # 105-byte image: alignment gaps follow it
    metas, size = wire.layout(tensors)
    expected = bytearray(size)
    wire.write_payload(tensors, metas, memoryview(expected))
    write_payload_file(str(path), tensors, metas, size)
    assert path.read_bytes() == bytes(expected)  # gaps are zeros, the old tail is cut
