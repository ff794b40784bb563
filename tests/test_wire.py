"""The batch codec: structure, dtypes, chunking and zero-copy decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_batch

from batchwire import wire
from batchwire.v1 import batchwire_pb2 as pb


def roundtrip(batch, chunk_bytes: int = 1 << 20):
    tensors, structure = wire.flatten(batch)
    metas, size = wire.layout(tensors)
    payload = bytearray(size)
    wire.write_payload(tensors, metas, memoryview(payload))
    header = pb.BatchHeader(
        batch_index=5, payload_size=size, raw_size=size, tensors=metas, structure=structure
    )
    frames = list(wire.frames(header, memoryview(bytes(payload)), chunk_bytes))
    assembler = wire.BatchAssembler()
    results = [r for r in (assembler.add(wire.parse_chunk(f)) for f in frames) if r is not None]
    assert len(results) == 1 and not assembler.pending
    index, decoded = results[0]
    assert index == 5
    return decoded, frames


ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_roundtrips(dtype):
    tensor = (torch.randn(3, 5) * 50).to(dtype)
    decoded, _ = roundtrip({"t": tensor})
    assert_same_batch(decoded, {"t": tensor})


def test_nested_structure_roundtrips():
    batch = {
        "a": (torch.arange(3), [torch.ones(2, 2), {"deep": torch.zeros(1, dtype=torch.uint8)}]),
        "b": torch.tensor(7.0),
        "empty": torch.empty(0, 4),
    }
    decoded, _ = roundtrip(batch)
    assert_same_batch(decoded, batch)


def test_non_contiguous_tensor_is_sent_contiguous():
    tensor = torch.arange(12).reshape(3, 4).t()
    decoded, _ = roundtrip([tensor])
    assert decoded[0].is_contiguous() and torch.equal(decoded[0], tensor)


def test_large_payload_splits_into_chunks_and_reassembles():
    tensor = torch.randn(1000, 1000)  # 4 MB over 64 KiB chunks
    decoded, frames = roundtrip((tensor,), chunk_bytes=64 << 10)
    assert len(frames) == 62
    assert all(len(f) <= (64 << 10) + 1024 for f in frames)
    assert torch.equal(decoded[0], tensor)


def test_frames_are_valid_batchchunk_protobuf():
    tensor = torch.arange(10, dtype=torch.int32)
    _, frames = roundtrip((tensor,), chunk_bytes=16)
    first = pb.BatchChunk.FromString(frames[0])
    assert first.HasField("header") and first.header.tensors[0].dtype == pb.INT32
    data = first.data + b"".join(pb.BatchChunk.FromString(f).data for f in frames[1:])
    assert data == tensor.numpy().tobytes()


def test_single_chunk_decodes_without_copy():
    tensor = torch.arange(16, dtype=torch.float32)
    tensors, structure = wire.flatten(tensor)
    metas, size = wire.layout(tensors)
    payload = bytearray(size)
    wire.write_payload(tensors, metas, memoryview(payload))
    header = pb.BatchHeader(payload_size=size, raw_size=size, tensors=metas, structure=structure)
    frame = next(wire.frames(header, memoryview(payload), 1 << 20))
    _, decoded = wire.BatchAssembler().add(wire.parse_chunk(frame))
    # The tensor's memory lies inside the received frame itself: a view, not a copy.
    start = np.frombuffer(frame, np.uint8).ctypes.data
    assert start <= decoded.data_ptr() < start + len(frame)
    assert torch.equal(decoded, tensor)


def test_offsets_are_aligned():
    tensors = [torch.ones(3, dtype=torch.uint8), torch.ones(5, dtype=torch.float64)]
    metas, _ = wire.layout(tensors)
    assert [m.offset % wire.ALIGNMENT for m in metas] == [0, 0]


def test_unsendable_leaf_is_rejected_with_its_path():
    with pytest.raises(wire.WireError, match=r"cannot send a str at 'meta.name'"):
        wire.flatten({"meta": {"name": "x"}})
    with pytest.raises(wire.WireError, match="complex64 cannot travel"):
        wire.flatten(torch.zeros(2, dtype=torch.complex64))


def test_nesting_up_to_max_depth_travels_and_deeper_is_refused():
    # Each level is two protobuf messages; protobuf refuses to decode past 100 (issue 17).
    batch = torch.arange(3)
    for _ in range(wire.MAX_DEPTH):
        batch = [batch]
    decoded, _ = roundtrip(batch)
    assert_same_batch(decoded, batch)
    with pytest.raises(wire.WireError, match=f"more than {wire.MAX_DEPTH} containers deep"):
        wire.flatten({"deeper": batch})


def test_truncated_batch_is_an_error():
    header = pb.BatchHeader(batch_index=0, payload_size=10)
    assembler = wire.BatchAssembler()
    assert assembler.add(wire.Chunk(header, memoryview(b"abc"))) is None
    with pytest.raises(wire.WireError, match="ended after 3 of 10 bytes"):
        assembler.add(wire.Chunk(pb.BatchHeader(batch_index=1, payload_size=1), memoryview(b"x")))


def test_field_infos_name_leaves_by_path():
    tensors, structure = wire.flatten(
        {"x": torch.zeros(2, 3), "y": (torch.zeros(2), torch.zeros(2, dtype=torch.uint8))}
    )
    names = [
        (f.name, wire.dtype_name(f.dtype), list(f.shape))
        for f in wire.field_infos(structure, tensors)
    ]
    assert names == [("x", "float32", [2, 3]), ("y.0", "float32", [2]), ("y.1", "uint8", [2])]


def _encoded(batch, index: int) -> tuple[pb.BatchHeader, memoryview]:
    tensors, structure = wire.flatten(batch)
    metas, size = wire.layout(tensors)
    payload = bytearray(size)
    wire.write_payload(tensors, metas, memoryview(payload))
    header = pb.BatchHeader(
        batch_index=index, payload_size=size, raw_size=size, tensors=metas, structure=structure
    )
    return header, memoryview(bytes(payload))


def test_packed_batches_are_one_valid_message_and_unpack_in_order():
    batches = [{"x": torch.full((3,), i, dtype=torch.int16)} for i in range(4)]
    batches.append({"x": torch.empty(0, dtype=torch.int16)})  # no data field at all
    frame = wire.packed_frame([_encoded(b, 10 + i) for i, b in enumerate(batches)])
    message = pb.BatchChunk.FromString(frame)  # what a client in any language sees
    assert message.header.batch_index == 10 and len(message.packed) == 4
    assert [p.header.batch_index for p in message.packed] == [11, 12, 13, 14]
    assembler = wire.BatchAssembler()
    got = list(assembler.feed(wire.parse_chunk(frame)))
    assert [header.batch_index for header, _ in got] == [10, 11, 12, 13, 14]
    for (_, decoded), batch in zip(got, batches, strict=True):
        assert_same_batch(decoded, batch)
    assert not assembler.pending


def test_a_packed_batch_cannot_start_inside_an_unfinished_one():
    big_header, big_payload = _encoded({"x": torch.arange(100)}, 0)
    first = next(wire.frames(big_header, big_payload, 64))  # only part of batch 0
    assembler = wire.BatchAssembler()
    assert list(assembler.feed(wire.parse_chunk(first))) == []
    small = wire.packed_frame([_encoded({"x": torch.arange(2)}, 1)])
    with pytest.raises(wire.WireError, match="batch 0 ended after"):
        list(assembler.feed(wire.parse_chunk(small)))
