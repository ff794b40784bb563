"""Client reassembly into huge-page buffers: same tensors, and they outlive the assembler."""

from __future__ import annotations

import gc
import mmap
import subprocess
import sys

import torch

from batchwire import allocator, wire
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


def test_frames_read_from_a_file_are_the_same_bytes(tmp_path) -> None:
    batches = [({"x": torch.arange(1000 + i), "y": torch.ones(3, 5)}, 7 + i) for i in range(3)]
    encoded, blob = [], bytearray(b"?" * 100)  # payloads at odd offsets of one file
    for batch, index in batches:
        tensors, structure = wire.flatten(batch)
        metas, size = wire.layout(tensors)
        payload = bytearray(size)
        wire.write_payload(tensors, metas, memoryview(payload))
        header = pb.BatchHeader(batch_index=index, payload_size=size, tensors=metas)
        header.structure.CopyFrom(structure)
        encoded.append((header, bytes(payload), len(blob)))
        blob += payload + b"!" * 3
    path = tmp_path / "payloads"
    path.write_bytes(blob)
    in_file = [(h, wire.FileSlice(str(path), offset, len(p))) for h, p, offset in encoded]
    in_memory = [(h, memoryview(p)) for h, p, _ in encoded]
    for (header, sliced), (_, view) in zip(in_file, in_memory, strict=True):
        assert list(wire.frames(header, sliced, 1000)) == list(wire.frames(header, view, 1000))
    assert wire.packed_frame(in_file) == wire.packed_frame(in_memory)
    assembler = wire.BatchAssembler()
    got = list(assembler.feed(wire.parse_chunk(wire.packed_frame(in_file))))
    assert [h.batch_index for h, _ in got] == [7, 8, 9]
    assert torch.equal(got[2][1]["x"], torch.arange(1002))


def test_reassembly_buffers_are_reused_only_once_their_batch_is_gone(monkeypatch) -> None:
    made = []
    monkeypatch.setattr(wire, "HUGE_PAGE_MIN_BYTES", 1)  # every multi-chunk batch is "large"
    monkeypatch.setattr(wire, "batch_buffer", lambda size: made.append(size) or bytearray(size))
    images = [torch.full((4, 1000), float(i)) for i in range(6)]
    assembler = wire.BatchAssembler()
    kept = []
    for i, image in enumerate(images):
        for frame in _frames({"x": image}, chunk_bytes=4096):
            done = assembler.add(wire.parse_chunk(frame))
        assert torch.equal(done[1]["x"], image)
        if i < 2:
            kept.append(done[1]["x"])  # still in use: its memory must not be handed out again
        del done
        gc.collect()
    assert torch.equal(kept[0], images[0]) and torch.equal(kept[1], images[1])
    assert len(made) == 3  # two kept, one going round for the other four batches


def test_small_reassembly_buffers_go_round_only_under_fixed_malloc_thresholds(monkeypatch) -> None:
    # Below 32 MiB a kept buffer would, under glibc's adaptive thresholds, push grpcio's
    # messages into fresh mmaps; once batchwire.allocator fixed them it saves zeroing.
    images = [torch.full((4, 1000), float(i)) for i in range(4)]
    for fixed, pooled in ((False, 0), (True, 1)):  # pooled: buffers the pool made
        monkeypatch.setattr(allocator, "_decided", fixed)
        made: list[int] = []
        monkeypatch.setattr(
            wire, "batch_buffer", lambda size, made=made: made.append(size) or bytearray(size)
        )
        assembler = wire.BatchAssembler()
        for image in images:
            for frame in _frames({"x": image}, chunk_bytes=4096):
                done = assembler.add(wire.parse_chunk(frame))
            assert torch.equal(done[1]["x"], image)
            del done
            gc.collect()
        assert len(made) == pooled, (fixed, made)  # else each a fresh heap bytearray


def test_the_pool_keeps_the_buffers_returned_last_whatever_their_size(monkeypatch) -> None:
    # Dynamic batching: sizes vary, so old sizes must not hold the pool's places.
    monkeypatch.setattr(allocator, "_decided", True)
    made: list[int] = []
    monkeypatch.setattr(wire, "batch_buffer", lambda size: made.append(size) or bytearray(size))
    pool = wire.BufferPool(keep=2)
    for size in (100, 200, 300):
        view = pool.take(size)
        del view
        gc.collect()
    assert made == [100, 200, 300]
    pool.take(300)  # returned last: kept
    pool.take(200)
    assert made == [100, 200, 300]
    pool.take(100)  # the oldest: let go when 300 came back
    assert made == [100, 200, 300, 100]


AT_THE_FILE_LIMIT = """
import os, resource, sys
from batchwire import wire
from batchwire.v1 import batchwire_pb2 as pb
path = sys.argv[1]
data = open(path, "rb").read()
owner = memoryview(data)[100:]  # the batch's mapping: bytes 100.. of the file
piece = wire.FileSlice(path, 100, len(owner), owner=owner)[1000:5000]
header = pb.BatchHeader(batch_index=3, payload_size=len(piece))
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:  # every descriptor left, taken
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    frames = list(wire.frames(header, piece, 1 << 20))
    expected = list(wire.frames(header, memoryview(data)[1100:5100], 1 << 20))
    print("same" if frames == expected else "different")
"""


def test_a_process_at_its_open_file_limit_sends_the_bytes_from_the_mapping(tmp_path) -> None:
    # The gRPC process under "too many open files" ended a stream UNKNOWN (an OSError
    # from opening the payload file); the mapping holds the same bytes.
    path = tmp_path / "payloads"
    path.write_bytes(bytes(range(256)) * 64)
    done = subprocess.run(
        [sys.executable, "-c", AT_THE_FILE_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["same"], done.stdout
