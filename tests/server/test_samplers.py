"""The vectorised order equals torch's DistributedSampler exactly."""

from __future__ import annotations

import itertools

import pytest
from torch.utils.data import DistributedSampler

from batchwire.server.requests import InvalidRequest, plan_stream
from batchwire.server.samplers import BatchPlan, distributed_order
from batchwire.v1 import batchwire_pb2 as pb


@pytest.mark.parametrize(
    ("length", "world_size", "shuffle", "seed", "epoch"),
    list(itertools.product([1, 2, 10, 103], [1, 3, 4, 16], [False, True], [0, 9], [0, 3])),
)
def test_order_equals_distributed_sampler(length, world_size, shuffle, seed, epoch):
    for rank in range(world_size):
        sampler = DistributedSampler(
            range(length), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
        sampler.set_epoch(epoch)
        ours = distributed_order(
            length, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size
        )
        assert ours.tolist() == list(sampler)


def test_batch_plan_slices_and_drops_last():
    plan = BatchPlan.fixed(
        distributed_order(10, shuffle=False, seed=0, epoch=0, rank=0, world_size=1), 4, False
    )
    assert len(plan) == 3 and plan[2].tolist() == [8, 9]
    assert len(BatchPlan.fixed(plan.indices, 4, True)) == 2
    with pytest.raises(IndexError):
        plan[3]


def test_plan_stream_positions_honour_start_end_and_stride():
    request = pb.StreamBatchesRequest(
        dataset="d", batch_size=2, world_size=1, start_batch=1, end_batch=9, batch_stride=3
    )
    assert list(plan_stream(request, length=20, max_batch_size=8).positions) == [1, 4, 7]
    with pytest.raises(InvalidRequest, match="end_batch"):
        plan_stream(
            pb.StreamBatchesRequest(batch_size=2, world_size=1, end_batch=11),
            length=20,
            max_batch_size=8,
        )
