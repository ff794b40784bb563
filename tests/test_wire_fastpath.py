"""Client reassembly into huge-page buffers: same tensors, and they outlive the assembler."""

from __future__ import annotations

import gc
import mmap

import torch

from batchwire import wire
from batchwire.v1 import batchwire_pb2 as pb


def _frames(batch, chunk_bytes: int) -> list[bytes]:
    tensors, structure = wire.flatten(batch)
    metas, size = wire.layout(tensors)
    payload = bytearray(size)
    wire.write_payload(tensors, metas, memoryview(payload))
    header = pb.BatchHeader(payload_size=size, raw_size=size, tensors=metas, structure=structure)
    return list(wire.frames(header, memoryview(payload), chunk_bytes))


def test_large_batches_reassemble_into_a_map_small_ones_into_bytes() -> None:
    assert isinstance(wire.batch_buffer(wire.HUGE_PAGE_MIN_BYTES - 1), bytearray)
    assert isinstance(wire.batch_buffer(wire.HUGE_PAGE_MIN_BYTES), mmap.mmap | bytearray)


def test_multi_chunk_batch_decodes_and_outlives_the_assembler() -> None:
    image = torch.randint(0, 256, (6, 3, 224, 224), dtype=torch.uint8)  # 0.9 MB
    label = torch.arange(6)
    frames = _frames((image, label), chunk_bytes=100_000)
    assert len(frames) > 5
    assembler = wire.BatchAssembler()
    done = [assembler.add(wire.parse_chunk(f)) for f in frames]
    assert done[:-1] == [None] * (len(frames) - 1)
    _, (got_image, got_label) = done[-1]
    del assembler, done, frames
    gc.collect()
    assert torch.equal(got_image, image) and torch.equal(got_label, label)
    got_image.add_(1)  # writable memory the batch owns


def test_huge_buffer_path(monkeypatch) -> None:
    monkeypatch.setattr(wire, "HUGE_PAGE_MIN_BYTES", 1)  # every multi-chunk batch takes it
    image = torch.randn(4, 1000)
    assembler = wire.BatchAssembler()
    for frame in _frames({"x": image}, chunk_bytes=4096):
        done = assembler.add(wire.parse_chunk(frame))
    assert torch.equal(done[1]["x"], image)
