"""The plan cache keeps plans within its byte budget, shares held plans, plans once per key."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from batchwire.server import requests
from batchwire.server.pipeline import SamplerConfig
from batchwire.server.plan_cache import ENTRY_BYTES, PlanCache
from batchwire.server.requests import PLANS, InvalidRequest, plan_stream
from batchwire.server.samplers import BatchPlan
from batchwire.v1 import batchwire_pb2 as pb

MIB = 1 << 20


def plan_of(nbytes: int) -> BatchPlan:
    return BatchPlan.fixed(np.zeros(nbytes // 8, dtype=np.int64), 4, False)


def test_kept_plans_stay_within_the_budget_least_recently_used_first():
    cache = PlanCache(max_bytes=3 * MIB + 3 * ENTRY_BYTES)
    for key in "abcd":
        cache.get(key, lambda: plan_of(MIB))
        assert cache.kept_bytes <= cache.max_bytes
    assert len(cache) == 3
    cache.get("b", lambda: pytest.fail("b is kept"))  # b is now the most recent
    cache.get("e", lambda: plan_of(MIB))
    cache.get("b", lambda: pytest.fail("b is kept"))
    computed = []
    cache.get("c", lambda: computed.append("c") or plan_of(MIB))
    assert computed == ["c"]  # c went first: the least recently used
    cache.resize(MIB + ENTRY_BYTES)
    assert len(cache) == 1 and cache.kept_bytes <= MIB + ENTRY_BYTES


def test_empty_plans_are_not_free():
    # Any number of distinct requests (new seeds, epochs) keeps at most budget / entry cost.
    cache = PlanCache(max_bytes=100 * ENTRY_BYTES)
    for seed in range(10_000):
        cache.get(seed, lambda: plan_of(0))
    assert len(cache) == 100


def test_a_plan_over_the_budget_is_shared_while_held_and_then_freed():
    cache = PlanCache(max_bytes=MIB)
    held = cache.get("big", lambda: plan_of(4 * MIB))
    assert len(cache) == 0 and cache.kept_bytes == 0
    assert cache.get("big", lambda: pytest.fail("a stream holds it")) is held
    del held
    gc.collect()
    computed = []
    cache.get("big", lambda: computed.append(1) or plan_of(4 * MIB))
    assert computed == [1]


def test_identical_requests_arriving_together_plan_once():
    cache = PlanCache()
    started, release = threading.Event(), threading.Event()
    calls = []

    def compute() -> BatchPlan:
        calls.append(1)
        started.set()
        assert release.wait(30)
        return plan_of(64)

    results: list[BatchPlan] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", compute)))]
    threads[0].start()
    assert started.wait(30)
    threads += [threading.Thread(target=lambda: results.append(cache.get("k", compute)))]
    threads[1].start()
    release.set()
    for thread in threads:
        thread.join(30)
    assert len(calls) == 1 and len(results) == 2 and results[0] is results[1]


def test_a_failed_plan_is_not_kept():
    cache = PlanCache()
    with pytest.raises(InvalidRequest):
        cache.get("k", lambda: (_ for _ in ()).throw(InvalidRequest("no")))
    assert cache.get("k", lambda: plan_of(8)).nbytes == 8


def test_requests_for_huge_plans_are_not_kept():
    request = pb.StreamBatchesRequest(
        batch_size=64, world_size=1, sampler=pb.SamplerSpec(kind="random", num_samples=1 << 20)
    )
    budget = PLANS.max_bytes
    PLANS.resize(1 << 20)  # below the 8 MiB plan
    try:
        before = PLANS.kept_bytes  # other tests of this process may have left small plans
        plan = plan_stream(request, length=10, max_batch_size=64).plan
        assert plan.nbytes == 8 << 20 and PLANS.kept_bytes <= before
    finally:
        PLANS.resize(budget)


def test_unknown_fields_of_a_sampler_spec_are_not_part_of_the_key():
    spec = pb.SamplerSpec(kind="random", num_samples=40)
    unknown_field = b"\xc2\x3e\x04junk"  # field 1000, length 4
    padded = pb.SamplerSpec.FromString(spec.SerializeToString() + unknown_field)
    config = SamplerConfig()  # the dataset's: part of the key
    plans = [
        plan_stream(
            pb.StreamBatchesRequest(batch_size=4, world_size=1, sampler=sampler),
            length=10,
            max_batch_size=8,
            sampler=config,
        ).plan
        for sampler in (spec, padded)
    ]
    assert plans[0] is plans[1]


def test_fixed_plans_hold_eight_bytes_per_sample():
    plan = BatchPlan.fixed(np.arange(10, dtype=np.int64), 1, False)
    assert plan.nbytes == 80 and len(plan) == 10 and plan.sizes.tolist() == [1] * 10
    plan = BatchPlan.fixed(np.arange(10, dtype=np.int64), 4, True)
    assert len(plan) == 2 and plan[1].tolist() == [4, 5, 6, 7] and plan.sizes.tolist() == [4, 4]


def test_heavy_plans_are_computed_a_few_at_a_time(monkeypatch):
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(requests, "_heavy_plans", slots)
    monkeypatch.setattr(requests, "HEAVY_PLAN_SAMPLES", 100)
    monkeypatch.setattr(requests, "PLANNING_WAIT_SECONDS", 0.1)

    def plan(num_samples: int, seed: int) -> BatchPlan:
        spec = pb.SamplerSpec(kind="random", num_samples=num_samples)
        request = pb.StreamBatchesRequest(batch_size=4, world_size=1, seed=seed, sampler=spec)
        return plan_stream(request, length=10, max_batch_size=8).plan

    assert slots.acquire(timeout=1)  # another heavy plan is being computed
    assert len(plan(99, seed=1).indices) == 99  # light plans do not wait
    with pytest.raises(requests.PlannerBusy):
        plan(100, seed=2)
    slots.release()
    assert len(plan(100, seed=2).indices) == 100
