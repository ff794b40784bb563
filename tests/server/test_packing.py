"""Small batches travel several per task and several per message (real server), unchanged."""

from __future__ import annotations

import grpc
from conftest import assert_same_batch

from batchwire import wire
from batchwire.client import BatchClient
from batchwire.v1 import batchwire_pb2 as pb
from batchwire.v1 import batchwire_pb2_grpc


def _request(**fields) -> pb.StreamBatchesRequest:
    fields.setdefault("batch_size", 2)
    return pb.StreamBatchesRequest(dataset="dict", world_size=1, shuffle=True, seed=4, **fields)


def _messages(target: str, request: pb.StreamBatchesRequest) -> list[pb.BatchChunk]:
    with grpc.insecure_channel(target) as channel:
        return list(batchwire_pb2_grpc.BatchServiceStub(channel).StreamBatches(request))


def test_packed_and_unpacked_streams_carry_the_same_batches(core_server):
    client = BatchClient(core_server.target)
    packed = list(client.batches(_request()))  # the Python client accepts packing
    single = list(client.batches(_request(max_batches_per_message=1)))
    assert [i for i, _ in packed] == [i for i, _ in single] == list(range(52))
    for (_, a), (_, b) in zip(packed, single, strict=True):
        assert_same_batch(a, b)


def test_messages_hold_several_small_batches_only_when_asked(core_server):
    # A generated stub (what a client in another language uses) parses packed messages.
    packed = _messages(core_server.target, _request(max_batches_per_message=8))
    counts = [1 + len(message.packed) for message in packed]
    assert sum(counts) == 52 and max(counts) > 1 and max(counts) <= 8
    indices = [m.header.batch_index for message in packed for m in (message, *message.packed)]
    assert indices == list(range(52))
    single = _messages(core_server.target, _request())  # field unset: one per message
    assert len(single) == 52 and not any(message.packed for message in single)
    assert [m.header.batch_index for m in single] == list(range(52))


def test_a_packed_stream_decodes_like_the_unpacked_one(core_server):
    packed = _messages(core_server.target, _request(max_batches_per_message=16, end_batch=20))
    assembler = wire.BatchAssembler()
    decoded = [
        batch["index"].tolist()
        for message in packed
        for _, batch in assembler.feed(wire.parse_chunk(message.SerializeToString()))
    ]
    single = [
        b["index"].tolist()
        for _, b in BatchClient(core_server.target).batches(
            _request(max_batches_per_message=1, end_batch=20)
        )
    ]
    assert decoded == single and len(decoded) == 20
