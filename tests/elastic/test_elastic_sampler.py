"""The "elastic" sampler equals its definition, written here again with numpy alone (issue 12, 2).

Definition (batchwire.proto, SamplerSpec.kind): one global order per (seed,
epoch); from global position p each step takes the next world_size * batch_size
samples, and rank r's batch is the r-th run of batch_size of them; a short last
step is dropped with drop_last, else split in world_size runs as evenly as
possible (the first R % world_size ranks one more; an empty run: no batch).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _serverproc import ServerProcess
from torch.utils.data import DistributedSampler

from batchwire.client import RemoteDataset
from batchwire.server.requests import InvalidRequest, plan_stream
from batchwire.server.samplers import global_order
from batchwire.v1 import batchwire_pb2 as pb


def reference(
    order: np.ndarray, world_size: int, batch_size: int, drop_last: bool, start: int = 0
) -> list[list[list[int]]]:
    """Each rank's batches, step by step, straight from the definition."""
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    position = start
    while position < len(order):
        step = order[position : position + world_size * batch_size]
        if len(step) == world_size * batch_size:
            runs = [step[r * batch_size : (r + 1) * batch_size] for r in range(world_size)]
        elif drop_last:
            break
        else:
            base, extra = divmod(len(step), world_size)
            sizes = [base + (r < extra) for r in range(world_size)]
            cuts = np.cumsum([0, *sizes])
            runs = [step[cuts[r] : cuts[r + 1]] for r in range(world_size)]
        for rank, run in enumerate(runs):
            if len(run):
                ranks[rank].append(run.tolist())
        position += world_size * batch_size
    return ranks


def planned(
    length: int,
    world_size: int,
    batch_size: int,
    drop_last: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
    start: int,
) -> list[list[list[int]]]:
    """Each rank's batches as the server plans them (the planning code of a real stream)."""
    ranks = []
    for rank in range(world_size):
        request = pb.StreamBatchesRequest(
            dataset="d",
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            start_sample=start,
            sampler=pb.SamplerSpec(kind="elastic"),
        )
        stream = plan_stream(request, length=length, max_batch_size=1024)
        ranks.append([stream.plan[b].tolist() for b in stream.positions])
    return ranks


# 48 configurations: lengths with and without a short last step, fewer samples
# left than ranks, one rank, batches of one, starts in the middle of a step.
SHAPES = [(103, 4, 8), (50, 3, 5), (7, 8, 1), (64, 2, 16), (1, 1, 3), (0, 2, 2)]
ORDERS = [(False, 0, 0, 0), (True, 3, 1, 0), (True, 5, 2, 13), (False, 0, 0, 37)]
CONFIGS = [
    (*shape, drop_last, *order)
    for shape, drop_last, order in itertools.product(SHAPES, [False, True], ORDERS)
]


@pytest.mark.parametrize(
    ("length", "world_size", "batch_size", "drop_last", "shuffle", "seed", "epoch", "start"),
    CONFIGS,
)
def test_elastic_plan_equals_the_definition(
    length, world_size, batch_size, drop_last, shuffle, seed, epoch, start
):
    order = global_order(length, shuffle=shuffle, seed=seed, epoch=epoch)
    expected = reference(order, world_size, batch_size, drop_last, start)
    assert planned(length, world_size, batch_size, drop_last, shuffle, seed, epoch, start) == (
        expected
    )
    if not drop_last:  # the steps, rank by rank, are the order: every sample once
        steps = itertools.zip_longest(*expected, fillvalue=[])
        assert [i for step in steps for batch in step for i in batch] == order[start:].tolist()


def test_the_global_order_is_distributed_samplers_permutation():
    # With one rank and no padding DistributedSampler yields its permutation as it is.
    for length, seed, epoch in [(103, 0, 0), (50, 3, 1), (7, 5, 4)]:
        sampler = DistributedSampler(range(length), num_replicas=1, rank=0, seed=seed)
        sampler.set_epoch(epoch)
        assert global_order(length, shuffle=True, seed=seed, epoch=epoch).tolist() == list(sampler)


def test_elastic_order_does_not_depend_on_the_shape():
    order = global_order(103, shuffle=True, seed=1, epoch=0).tolist()
    for world_size, batch_size in [(1, 103), (2, 7), (5, 3), (4, 26)]:
        ranks = planned(103, world_size, batch_size, False, True, 1, 0, 0)
        steps = itertools.zip_longest(*ranks, fillvalue=[])
        assert [i for step in steps for batch in step for i in batch] == order


def test_start_sample_is_checked():
    request = pb.StreamBatchesRequest(
        dataset="d",
        batch_size=4,
        world_size=1,
        start_sample=-1,
        sampler=pb.SamplerSpec(kind="elastic"),
    )
    with pytest.raises(InvalidRequest, match="start_sample should be non-negative"):
        plan_stream(request, length=10, max_batch_size=64)
    request.start_sample = 3
    request.sampler.kind = "dynamic"
    with pytest.raises(InvalidRequest, match="'dynamic' sampler packs the whole epoch"):
        plan_stream(request, length=10, max_batch_size=64)


@pytest.mark.parametrize(
    ("world_size", "batch_size", "drop_last", "start"),
    [(3, 5, False, 0), (4, 8, True, 0), (2, 7, False, 17)],
)
def test_elastic_streams_equal_the_definition(
    core_server: ServerProcess, world_size: int, batch_size: int, drop_last: bool, start: int
):
    """Through the real server: the 'dict' dataset (103 items) streams the reference's batches."""
    order = global_order(103, shuffle=True, seed=4, epoch=2)
    expected = reference(order, world_size, batch_size, drop_last, start)
    for rank in range(world_size):
        ds = RemoteDataset(
            core_server.target,
            "dict",
            batch_size=batch_size,
            shuffle=True,
            seed=4,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            sampler="elastic",
        )
        ds.load_state_dict({**ds.state_dict(), "epoch": 2, "sample": start})
        assert len(ds) == len(expected[rank])
        assert [batch["index"].tolist() for batch in ds] == expected[rank]
