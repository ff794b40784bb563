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
from batchwire.server.batches import open_payload, write_batch


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
    payload = open_payload(path, size)
    assert not os.path.exists(path)  # the name is gone once mapped
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
