"""Bad requests get the right status and a message saying what was wrong; the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

from batchwire.client import BatchClient, RemoteDataset, ServerError
from batchwire.v1 import batchwire_pb2 as pb


def good_request(**overrides) -> pb.StreamBatchesRequest:
    fields = dict(dataset="dict", batch_size=8, world_size=1)
    fields.update(overrides)
    return pb.StreamBatchesRequest(**fields)


def stream_error(target: str, request: pb.StreamBatchesRequest) -> ServerError:
    with pytest.raises(ServerError) as info:
        list(BatchClient(target).batches(request))
    return info.value


def assert_still_serves(target: str) -> None:
    batches = list(BatchClient(target).batches(good_request(batch_size=50)))
    assert [index for index, _ in batches] == [0, 1, 2]
    assert batches[-1][1]["index"].tolist() == [100, 101, 102]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": -4}, "batch_size=-4"),
        ({"batch_size": 1025}, "max_batch_size"),
        ({"world_size": 0}, "world_size=0"),
        ({"world_size": -1}, "world_size=-1"),
        ({"rank": 3, "world_size": 3}, "rank=3"),
        ({"rank": -1, "world_size": 2}, "rank=-1"),
        ({"epoch": -1}, "epoch=-1"),
        ({"start_batch": 14}, "start_batch=14"),  # 103 samples / 8 = 13 batches
        ({"start_batch": -1}, "start_batch=-1"),
        ({"sampler": pb.SamplerSpec(kind="random", num_samples=1 << 40)}, "num_samples"),
        ({"sampler": pb.SamplerSpec(kind="shuffled")}, "'shuffled'"),
    ],
)
def test_out_of_range_parameters_are_invalid_argument(core_server, overrides, says):
    error = stream_error(core_server.target, good_request(**overrides))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details
    assert_still_serves(core_server.target)


def test_a_huge_world_size_costs_only_this_ranks_share(core_server):
    # DistributedSampler pads the epoch to a multiple of world_size; the server
    # must not build that padded epoch in memory.
    request = good_request(world_size=1 << 62, rank=(1 << 62) - 1, batch_size=4)
    [(index, batch)] = list(BatchClient(core_server.target).batches(request))
    assert index == 0 and batch["index"].tolist() == [((1 << 62) - 1) % 103]
    assert_still_serves(core_server.target)


def test_start_at_the_end_is_an_empty_stream(core_server):
    assert list(BatchClient(core_server.target).batches(good_request(start_batch=13))) == []


def test_unknown_dataset_is_not_found_listing_datasets(core_server):
    error = stream_error(core_server.target, good_request(dataset="imagenet"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert "'imagenet'" in error.details
    for name in ("big", "dict", "failing", "tuple"):
        assert name in error.details
    with pytest.raises(ServerError) as info:
        BatchClient(core_server.target).describe("imagenet")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert_still_serves(core_server.target)


def test_dataset_that_raises_is_internal_naming_dataset_index_and_error(core_server):
    remote = RemoteDataset(core_server.target, "failing", batch_size=4)
    received = []
    with pytest.raises(ServerError) as info:
        for batch in remote:
            received.append(batch)
    error = info.value
    assert error.code == grpc.StatusCode.INTERNAL
    assert "'failing'" in error.details
    assert "sample index 13" in error.details
    assert "ValueError: corrupt record 13" in error.details
    assert [b.flatten().tolist() for b in received] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert_still_serves(core_server.target)
    # The workers survived the error: a stream that avoids index 13 completes.
    tail = list(
        BatchClient(core_server.target).batches(
            good_request(dataset="failing", batch_size=4, start_batch=4)
        )
    )
    assert len(tail) == 6


def test_error_message_carries_the_status(core_server):
    error = stream_error(core_server.target, good_request(batch_size=0))
    assert str(error).startswith("INVALID_ARGUMENT")


def test_client_checks_arguments_before_calling():
    with pytest.raises(ValueError, match="batch_size=0"):
        RemoteDataset("127.0.0.1:1", "x", batch_size=0)
    with pytest.raises(ValueError, match="rank=2"):
        RemoteDataset("127.0.0.1:1", "x", batch_size=1, rank=2, world_size=2)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"batch_size": -5}, "batch_size=-5"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 10**12}, "max_batch_size"),
        ({"sampler": pb.SamplerSpec(kind="dynamic", max_items=10**12)}, "max_items"),
    ],
)
def test_dynamic_sampler_checks_its_batch_limits(core_server, overrides, says):
    request = good_request(**{"sampler": pb.SamplerSpec(kind="dynamic"), **overrides})
    error = stream_error(core_server.target, request)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details
    with pytest.raises(ServerError) as info:
        BatchClient(core_server.target).count_batches(request)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serves(core_server.target)


HUGE = "x" * (1 << 20)


@pytest.mark.parametrize(
    ("overrides", "code", "says"),
    [
        ({"dataset": HUGE}, grpc.StatusCode.NOT_FOUND, "unknown dataset 'xxxx"),
        ({"sampler": pb.SamplerSpec(kind=HUGE)}, grpc.StatusCode.INVALID_ARGUMENT, "kind 'xxxx"),
    ],
)
def test_echoed_client_strings_are_truncated(core_server, overrides, code, says):
    # A 1 MB value echoed whole would be a 1 MB trailer: the client would see
    # RESOURCE_EXHAUSTED (metadata too large) instead of the real status.
    client = BatchClient(core_server.target)
    for call in (
        lambda: list(client.batches(good_request(**overrides))),
        lambda: client.count_batches(good_request(**overrides)),
    ):
        with pytest.raises(ServerError) as info:
            call()
        assert info.value.code == code, info.value.details[:200]
        assert says in info.value.details
        assert len(info.value.details) < 1000
        assert "1048576 characters" in info.value.details  # says how long it was
    with pytest.raises(ServerError) as info:
        client.describe(HUGE)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and len(info.value.details) < 1000
    assert_still_serves(core_server.target)
