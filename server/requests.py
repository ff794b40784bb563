"""Checks a StreamBatches request and turns it into the list of batch positions to send.

The request's ``SamplerSpec`` chooses the sampler; fields it leaves at zero
take the dataset's configured defaults (``[datasets.NAME.sampler]``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchwire.server.pipeline import SamplerConfig
from batchwire.server.plan_cache import PlanCache
from batchwire.server.samplers import (
    KINDS,
    BatchPlan,
    BudgetError,
    distributed_order,
    dynamic_plan,
    elastic_order,
    global_order,
    random_order,
    subset_order,
    weighted_order,
)
from batchwire.v1 import batchwire_pb2 as pb


class InvalidRequest(ValueError):
    """A request parameter out of range; the message says which and why."""


ECHO_CHARS = 64
"""Most characters of a client's string that an error message repeats."""


def echo(value: str) -> str:
    """``repr(value)``, cut to ``ECHO_CHARS`` characters: for every message that echoes client input.

    A status message travels as a trailer, which clients limit to 16 KiB: a 1 MB
    dataset name echoed whole would turn NOT_FOUND into RESOURCE_EXHAUSTED.
    """
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"


@dataclass(frozen=True)
class StreamPlan:
    plan: BatchPlan
    positions: range
    sampler: str


def plan_stream(
    request: pb.StreamBatchesRequest,
    *,
    length: int,
    max_batch_size: int,
    sampler: SamplerConfig | None = None,
) -> StreamPlan:
    """Validates ``request`` against a dataset of ``length`` samples; raises ``InvalidRequest``."""
    config = sampler or SamplerConfig()
    kind = request.sampler.kind or config.kind
    if kind not in KINDS:
        raise InvalidRequest(
            f"sampler kind {echo(request.sampler.kind)} is not supported; "
            f"supported: {', '.join(KINDS)}"
        )
    # Every kind, dynamic included: its batches hold at most batch_size items unless
    # max_items says otherwise, and never more than max_batch_size.
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
    if request.batch_stride < 0:
        raise InvalidRequest(
            f"batch_stride should be non-negative, but got batch_stride={request.batch_stride}"
        )
    if request.start_sample < 0:
        raise InvalidRequest(
            f"start_sample should be non-negative, but got start_sample={request.start_sample}"
        )
    if request.start_sample and kind == "dynamic":
        raise InvalidRequest(
            f"start_sample={request.start_sample}: the 'dynamic' sampler packs the whole epoch, "
            "so it resumes at a start_batch only; leave start_sample at 0"
        )
    if kind == "elastic":
        plan = _elastic_plan(request, length)
    else:
        plan = _from_sample(_cached_plan(kind, request, config, length, max_batch_size), request)
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
    return StreamPlan(plan, range(request.start_batch, end, max(1, request.batch_stride)), kind)


PLANS = PlanCache()
"""The server's plans; ``DatasetRegistry`` sets its budget from ``[server] plan_cache_bytes``."""


def _cached_plan(
    kind: str,
    request: pb.StreamBatchesRequest,
    config: SamplerConfig,
    length: int,
    max_batch_size: int,
) -> BatchPlan:
    """``_plan``, remembered (see ``plan_cache``): the streams and resumes of an epoch share it."""
    spec = request.sampler
    # Parsed values only: the serialized spec would carry a client's unknown fields.
    key = (
        config,
        kind,
        spec.num_samples,
        spec.without_replacement,
        spec.max_tokens,
        spec.max_items,
        request.batch_size,
        request.shuffle,
        request.seed,
        request.epoch,
        request.rank,
        request.world_size,
        request.drop_last,
        length,
        max_batch_size,
    )
    epoch_samples = _epoch_samples(kind, spec, config, length)
    return PLANS.get(
        key,
        lambda: _within_planning_limit(
            epoch_samples, lambda: _plan(kind, request, config, length, max_batch_size)
        ),
    )


def _from_sample(plan: BatchPlan, request: pb.StreamBatchesRequest) -> BatchPlan:
    """The rank's order from ``start_sample`` on, cut into batches anew (a view, not a copy)."""
    if not request.start_sample:
        return plan
    return BatchPlan.fixed(
        plan.indices[request.start_sample :],
        request.batch_size,
        request.drop_last,
        seed=request.seed,
        epoch=request.epoch,
    )


def _elastic_plan(request: pb.StreamBatchesRequest, length: int) -> BatchPlan:
    """Rank ``rank``'s steps from global position ``start_sample`` (see ``elastic_order``).

    The global order is kept once per (shuffle, seed, epoch), whatever the shapes
    that ask for it; each shape's share of it is kept as well, for its streams.
    """
    order_key = ("elastic order", request.shuffle, request.seed, request.epoch, length)
    share_key = (
        *order_key,
        request.start_sample,
        request.rank,
        request.world_size,
        request.batch_size,
        request.drop_last,
    )

    def order() -> BatchPlan:
        indices = global_order(
            length, shuffle=request.shuffle, seed=request.seed, epoch=request.epoch
        )
        return BatchPlan.fixed(indices, max(1, length), False)

    def share() -> BatchPlan:
        indices = elastic_order(
            _within_planning_limit(length, lambda: PLANS.get(order_key, order)).indices,
            start=request.start_sample,
            rank=request.rank,
            world_size=request.world_size,
            batch_size=request.batch_size,
            drop_last=request.drop_last,
        )
        return BatchPlan.fixed(
            indices, request.batch_size, False, seed=request.seed, epoch=request.epoch
        )

    return PLANS.get(share_key, share)


HEAVY_PLAN_SAMPLES = 1 << 23
"""Plans of epochs this long or longer (64 MiB of indices, as much again while being cut
into a rank's share) are computed ``HEAVY_PLANS`` at a time, so that concurrent requests
for different plans cannot add their peaks up."""
HEAVY_PLANS = 2
PLANNING_WAIT_SECONDS = 120.0
_heavy_plans = threading.BoundedSemaphore(HEAVY_PLANS)


class PlannerBusy(RuntimeError):
    """Heavy plans queued up longer than ``PLANNING_WAIT_SECONDS``."""


def _within_planning_limit(epoch_samples: int, compute: Callable[[], BatchPlan]) -> BatchPlan:
    if epoch_samples < HEAVY_PLAN_SAMPLES:
        return compute()
    if not _heavy_plans.acquire(timeout=PLANNING_WAIT_SECONDS):
        raise PlannerBusy(
            f"{HEAVY_PLANS} plans of {HEAVY_PLAN_SAMPLES} samples or more were being computed "
            f"for over {PLANNING_WAIT_SECONDS:.0f}s; retry later"
        )
    try:
        return compute()
    finally:
        _heavy_plans.release()


def _plan(
    kind: str,
    request: pb.StreamBatchesRequest,
    config: SamplerConfig,
    length: int,
    max_batch_size: int,
) -> BatchPlan:
    spec = request.sampler
    shard = {
        "seed": request.seed,
        "epoch": request.epoch,
        "rank": request.rank,
        "world_size": request.world_size,
    }
    if kind == "dynamic":
        return _dynamic_plan(request, config, length, max_batch_size, shard)
    if kind == "distributed":
        order = distributed_order(length, shuffle=request.shuffle, **shard)
    elif kind == "subset":
        if config.subset is None:
            raise _not_configured(kind, "indices = FILE")
        order = subset_order(config.subset, shuffle=request.shuffle, **shard)
    else:
        num_samples = _epoch_samples(kind, spec, config, length)
        if kind == "random":
            order = random_order(length, num_samples=num_samples, **shard)
        else:
            if config.weights is None:
                raise _not_configured(kind, "weights = FILE or balance = FIELD")
            replacement = not (spec.without_replacement or config.without_replacement)
            nonzero = int((config.weights > 0).sum())
            if not replacement and num_samples > nonzero:
                raise InvalidRequest(
                    f"sampler.num_samples={num_samples} exceeds the {nonzero} samples of nonzero "
                    "weight; without replacement each can be drawn once"
                )
            order = weighted_order(
                config.weights, num_samples=num_samples, replacement=replacement, **shard
            )
    return BatchPlan.fixed(
        order, request.batch_size, request.drop_last, seed=request.seed, epoch=request.epoch
    )


def _dynamic_plan(
    request: pb.StreamBatchesRequest,
    config: SamplerConfig,
    length: int,
    max_batch_size: int,
    shard: dict[str, int],
) -> BatchPlan:
    spec = request.sampler
    if spec.max_tokens < 0:
        raise InvalidRequest(
            f"sampler.max_tokens should be non-negative, but got max_tokens={spec.max_tokens}"
        )
    if not 0 <= spec.max_items <= max_batch_size:
        raise InvalidRequest(
            f"sampler.max_items should be in [0, {max_batch_size}] (the server's max_batch_size), "
            f"but got max_items={spec.max_items}"
        )
    max_tokens = spec.max_tokens or config.max_tokens
    # Items per batch: the request's max_items, else the config's, else batch_size;
    # never over the server's max_batch_size (a config may say more).
    max_items = min(spec.max_items or config.max_items or request.batch_size, max_batch_size)
    if max_tokens and config.lengths is None:
        raise _not_configured("dynamic", "lengths = FILE or length_field = FIELD")
    # An item budget alone needs no lengths: every sample counts as one token.
    lengths = config.lengths if max_tokens else np.ones(length, dtype=np.int64)
    try:
        plan = dynamic_plan(
            lengths,
            max_tokens=max_tokens,
            max_items=max_items,
            shuffle=request.shuffle,
            drop_last=request.drop_last,
            **shard,
        )
    except BudgetError as exc:
        raise InvalidRequest(f"sampler.max_tokens: {exc}") from None
    return BatchPlan(plan.indices, plan.offsets, request.seed, request.epoch)


MAX_NUM_SAMPLES = 1 << 27
"""Most samples one weighted/random epoch may draw: the plan lives in server memory (8 B each)."""


def _epoch_samples(kind: str, spec: pb.SamplerSpec, config: SamplerConfig, length: int) -> int:
    """Samples in the whole epoch's order (what planning holds at its peak); checks num_samples."""
    if kind in ("random", "weighted"):
        value = spec.num_samples or config.num_samples or length
        if not 0 <= value <= MAX_NUM_SAMPLES:
            raise InvalidRequest(
                f"sampler.num_samples should be in [0, {MAX_NUM_SAMPLES}], but got {value}"
            )
        return value
    if kind == "subset" and config.subset is not None:
        return len(config.subset)
    return length


def _not_configured(kind: str, keys: str) -> InvalidRequest:
    return InvalidRequest(
        f"sampler kind {kind!r} needs {keys} in this dataset's [datasets.NAME.sampler] "
        "config, which the server does not have"
    )
