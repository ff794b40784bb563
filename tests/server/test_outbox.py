"""Outbox: small batches packed up to the chunk size, big ones chunked, nothing lost or reordered."""

from __future__ import annotations

import torch

from batchwire import wire
from batchwire.server.outbox import Outbox
from batchwire.v1 import batchwire_pb2 as pb


def _batch(index: int, numel: int) -> tuple[pb.BatchHeader, memoryview]:
    tensor = torch.full((numel,), index, dtype=torch.uint8)
    tensors, structure = wire.flatten(tensor)
    metas, size = wire.layout(tensors)
    header = pb.BatchHeader(
        batch_index=index, payload_size=size, raw_size=size, tensors=metas, structure=structure
    )
    return header, memoryview(tensor.numpy().tobytes())


def _run(sizes: list[int], chunk_bytes: int, per_message: int) -> tuple[list[bytes], list[int]]:
    sent: list[int] = []
    outbox = Outbox(chunk_bytes, per_message, lambda header: sent.append(header.batch_index))
    messages: list[bytes] = []
    for index, numel in enumerate(sizes):
        messages += outbox.add(*_batch(index, numel))
    messages += outbox.flush()
    return messages, sent


def _decode(messages: list[bytes]) -> list[tuple[int, int]]:
    assembler = wire.BatchAssembler()
    out = []
    for message in messages:
        for header, batch in assembler.feed(wire.parse_chunk(message)):
            out.append((header.batch_index, int(batch.numel())))
            assert bool((batch == header.batch_index).all())
    assert not assembler.pending
    return out


def test_small_batches_are_packed_up_to_the_chunk_size_and_big_ones_chunked():
    sizes = [100, 100, 100, 100, 5000, 100, 100]
    messages, sent = _run(sizes, chunk_bytes=1024, per_message=16)
    assert _decode(messages) == list(enumerate(sizes))
    assert sent == list(range(7))
    # 100 B batches: at most 7 fit in 1 KiB with their headers; here the big one splits them.
    assert [len(pb.BatchChunk.FromString(m).packed) for m in messages[:1]] == [3]
    assert all(len(m) <= 1024 + 256 for m in messages)
    assert len(messages) == 1 + 5 + 1  # 4 packed, 5000 B in 5 chunks, 2 packed


def test_the_count_limit_and_one_per_message():
    sizes = [10] * 10
    messages, _ = _run(sizes, chunk_bytes=1 << 20, per_message=4)
    assert [1 + len(pb.BatchChunk.FromString(m).packed) for m in messages] == [4, 4, 2]
    single, _ = _run(sizes, chunk_bytes=1 << 20, per_message=1)
    assert len(single) == 10 and all(not pb.BatchChunk.FromString(m).packed for m in single)
    assert _decode(single) == _decode(messages) == list(enumerate(sizes))


def test_flush_before_anything_is_added_sends_nothing():
    assert list(Outbox(1024, 16, lambda header: None).flush()) == []
