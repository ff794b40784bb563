"""Checks a StreamBatches request and turns it into the list of batch positions to send."""

from __future__ import annotations

from dataclasses import dataclass

from batchwire.server.samplers import BatchPlan, distributed_order
from batchwire.v1 import batchwire_pb2 as pb


class InvalidRequest(ValueError):
    """A request parameter out of range; the message says which and why."""


@dataclass(frozen=True)
class StreamPlan:
    plan: BatchPlan
    positions: range


def plan_stream(
    request: pb.StreamBatchesRequest, *, length: int, max_batch_size: int
) -> StreamPlan:
    """Validates ``request`` against a dataset of ``length`` samples; raises ``InvalidRequest``."""
    if not 0 < request.batch_size <= max_batch_size:
        raise InvalidRequest(
            f"batch_size should be in [1, {max_batch_size}] (the server's max_batch_size), "
            f"but got batch_size={request.batch_size}"
        )
    if request.world_size <= 0:
        raise InvalidRequest(
            f"world_size should be a positive integer, but got world_size={request.world_size}"
        )
    if not 0 <= request.rank < request.world_size:
        raise InvalidRequest(
            f"rank should be in [0, world_size - 1] = [0, {request.world_size - 1}], but got rank={request.rank}"
        )
    if request.epoch < 0:
        raise InvalidRequest(f"epoch should be non-negative, but got epoch={request.epoch}")
    if request.sampler.kind not in ("", "distributed"):
        raise InvalidRequest(
            f"sampler kind {request.sampler.kind!r} is not supported; supported: 'distributed'"
        )
    if request.batch_stride < 0:
        raise InvalidRequest(
            f"batch_stride should be non-negative, but got batch_stride={request.batch_stride}"
        )
    order = distributed_order(
        length,
        shuffle=request.shuffle,
        seed=request.seed,
        epoch=request.epoch,
        rank=request.rank,
        world_size=request.world_size,
    )
    plan = BatchPlan(order, request.batch_size, request.drop_last)
    total = len(plan)
    if not 0 <= request.start_batch <= total:
        raise InvalidRequest(
            f"start_batch should be in [0, {total}] (this rank's epoch has {total} batches), "
            f"but got start_batch={request.start_batch}"
        )
    end = request.end_batch or total
    if not request.start_batch <= end <= total:
        raise InvalidRequest(
            f"end_batch should be 0 (the end) or in [{request.start_batch}, {total}], "
            f"but got end_batch={request.end_batch}"
        )
    return StreamPlan(plan, range(request.start_batch, end, max(1, request.batch_stride)))
