"""Every sampler: deterministic in (seed, epoch), sharded across ranks, resumable (unit + real server)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from _serverproc import ServerProcess
from pipeline_data import batches, count, stream
from torch.utils.data import DistributedSampler, WeightedRandomSampler

from batchwire.client import BatchClient, ServerError
from batchwire.server.pipeline import SamplerConfig
from batchwire.server.requests import InvalidRequest, plan_stream
from batchwire.server.samplers import (
    balanced_weights,
    random_order,
    subset_order,
    weighted_order,
)
from batchwire.v1 import batchwire_pb2 as pb

# -- pure functions -----------------------------------------------------------------------


@pytest.mark.parametrize("replacement", [True, False])
def test_weighted_order_is_weighted_random_sampler(replacement):
    weights = np.linspace(0.1, 3.0, 50)
    generator = torch.Generator().manual_seed(11 + 2)
    expected = list(WeightedRandomSampler(weights.tolist(), 30, replacement, generator=generator))
    ours = weighted_order(
        weights, num_samples=30, replacement=replacement, seed=11, epoch=2, rank=0, world_size=1
    )
    assert ours.tolist() == expected


def test_random_order_shards_one_draw_like_distributed_sampler():
    draw = torch.randint(20, (23,), generator=torch.Generator().manual_seed(4)).tolist()
    shares = [
        random_order(20, num_samples=23, seed=3, epoch=1, rank=r, world_size=3).tolist()
        for r in range(3)
    ]
    assert [len(s) for s in shares] == [8, 8, 8]
    padded = draw + draw[:1]
    assert shares == [padded[r::3] for r in range(3)]


def test_subset_order_is_distributed_sampler_over_the_subset():
    subset = np.array([3, 9, 4, 17, 12, 1, 8])
    for rank in range(2):
        sampler = DistributedSampler(range(7), num_replicas=2, rank=rank, shuffle=True, seed=6)
        sampler.set_epoch(3)
        ours = subset_order(subset, shuffle=True, seed=6, epoch=3, rank=rank, world_size=2)
        assert ours.tolist() == subset[list(sampler)].tolist()


def test_balanced_weights_are_inverse_class_frequency():
    weights = balanced_weights(np.array([0, 0, 0, 1, 2, 2]))
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 2])


SAMPLING = SamplerConfig(
    weights=np.linspace(1, 2, 40),
    subset=np.arange(0, 40, 3),
    lengths=np.arange(40) % 9 + 1,
)
SPECS = {
    "distributed": {},
    "random": {"num_samples": 33},
    "weighted": {"num_samples": 37},
    "subset": {},
    "dynamic": {"max_tokens": 20},
}


def plan_for(kind: str, **fields):
    request = pb.StreamBatchesRequest(
        dataset="d",
        batch_size=fields.pop("batch_size", 4),
        shuffle=True,
        world_size=fields.pop("world_size", 1),
        sampler=pb.SamplerSpec(kind=kind, **SPECS[kind]),
        **fields,
    )
    return plan_stream(request, length=40, max_batch_size=64, sampler=SAMPLING)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_sampler_is_deterministic_in_seed_and_epoch_and_resumable(kind):
    first = plan_for(kind, seed=5, epoch=2)
    again = plan_for(kind, seed=5, epoch=2)
    other = plan_for(kind, seed=5, epoch=3)
    batches_of = lambda s: [s.plan[b].tolist() for b in s.positions]  # noqa: E731
    assert batches_of(first) == batches_of(again)
    assert batches_of(first) != batches_of(other)
    resumed = plan_for(kind, seed=5, epoch=2, start_batch=3)
    assert batches_of(resumed) == batches_of(first)[3:]
    end = plan_for(kind, seed=5, epoch=2, start_batch=len(first.plan))
    assert list(end.positions) == []


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_sampler_shards_across_ranks(kind):
    shares = [plan_for(kind, seed=1, rank=r, world_size=3).plan for r in range(3)]
    whole = plan_for(kind, seed=1).plan
    if kind == "dynamic":  # whole batches dealt out: disjoint, every sample once
        assert sorted(np.concatenate([p.indices for p in shares]).tolist()) == list(range(40))
    else:  # the one-rank order, padded from its start and strided, as DistributedSampler
        padded = np.resize(whole.indices, -(-len(whole.indices) // 3) * 3)
        for rank, share in enumerate(shares):
            assert share.indices.tolist() == padded[rank::3].tolist()


def test_plans_are_computed_once_per_request_parameters():
    first = plan_for("dynamic", seed=8, epoch=1, rank=1, world_size=2)
    assert plan_for("dynamic", seed=8, epoch=1, rank=1, world_size=2).plan is first.plan
    assert plan_for("dynamic", seed=8, epoch=2, rank=1, world_size=2).plan is not first.plan
    other_config = SamplerConfig(lengths=np.full(40, 3))
    request = pb.StreamBatchesRequest(
        batch_size=4, world_size=1, sampler=pb.SamplerSpec(kind="dynamic", max_tokens=20)
    )
    plan = plan_stream(request, length=40, max_batch_size=64, sampler=other_config).plan
    assert set(plan.sizes.tolist()) == {4}  # 4 items of 3 tokens: the batch_size caps items
    with pytest.raises(ValueError):
        plan.indices[0] = 1  # shared between streams: read-only


def test_requests_for_unconfigured_samplers_say_what_is_missing():
    request = pb.StreamBatchesRequest(
        dataset="d", batch_size=4, world_size=1, sampler=pb.SamplerSpec(kind="weighted")
    )
    with pytest.raises(InvalidRequest, match=r"weights = FILE or balance = FIELD"):
        plan_stream(request, length=10, max_batch_size=8)
    request.sampler.kind = "bogus"
    with pytest.raises(InvalidRequest, match="supported: distributed, random"):
        plan_stream(request, length=10, max_batch_size=8)
    request.sampler.kind = "weighted"
    request.sampler.without_replacement = True
    request.sampler.num_samples = 41
    with pytest.raises(InvalidRequest, match="without replacement"):
        plan_stream(request, length=40, max_batch_size=8, sampler=SAMPLING)


# -- a real server --------------------------------------------------------------------------

CONFIG = """
[datasets.imbalanced]
source = "arrays"
files = { label = "labels.npy", x = "x.npy" }
sampler = { kind = "weighted", balance = "label", num_samples = 22000 }

[datasets.weighted_file]
source = "arrays"
files = { label = "labels.npy", x = "x.npy" }
sampler = { weights = "weights.npy", indices = "subset.txt" }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("samplers")
    labels = np.array([0] * 1000 + [1] * 100, dtype=np.int64)  # 10:1
    np.save(folder / "labels.npy", labels)
    np.save(folder / "x.npy", np.arange(1100, dtype=np.float32))
    weights = np.zeros(1100)
    weights[[5, 50, 500]] = [1.0, 2.0, 1.0]
    np.save(folder / "weights.npy", weights)
    (folder / "subset.txt").write_text("7\n1099\n3\n42\n")
    path = folder / "samplers.toml"
    path.write_text(CONFIG)
    with ServerProcess(path, workers=2) as server:
        yield server


def test_balance_gives_uniform_classes_on_a_10_to_1_dataset(server):
    labels = torch.cat(
        [b["label"] for b in batches(server.target, "imbalanced", batch_size=1024, seed=1)]
    )
    assert len(labels) == 22000  # the config's num_samples; the request left the kind unset
    share = labels.float().mean().item()  # fraction of the rare class
    assert abs(share - 0.5) < 0.03, share
    # Unweighted, the rare class stays rare: the balance is the sampler's doing.
    plain = torch.cat(
        [
            b["label"]
            for b in batches(
                server.target, "imbalanced", batch_size=1100, sampler={"kind": "distributed"}
            )
        ]
    )
    assert int(plain.sum()) == 100 and len(plain) == 1100


def test_weighted_by_file_draws_only_positive_weights_and_shards(server):
    drawn = []
    for rank in range(2):
        got = stream(
            server.target,
            "weighted_file",
            batch_size=16,
            seed=2,
            epoch=4,
            rank=rank,
            world_size=2,
            sampler={"kind": "weighted", "num_samples": 4000},
        )
        assert len(got) == 125  # 2000 per rank in batches of 16
        drawn.append(torch.cat([b["x"] for _, b in got]))
    both = torch.cat(drawn)
    assert set(both.tolist()) == {5.0, 50.0, 500.0}  # the only samples of nonzero weight
    assert abs((both == 50).float().mean().item() - 0.5) < 0.03  # weight 2 of 4


def test_random_subset_and_resume_through_the_server(server):
    for sampler in (
        {"kind": "random", "num_samples": 50},
        {"kind": "subset"},
        {"kind": "weighted"},
    ):
        fields = dict(batch_size=8, shuffle=True, seed=3, epoch=1, sampler=sampler)
        full = stream(server.target, "weighted_file", **fields)
        tail = stream(server.target, "weighted_file", start_batch=1, **fields)
        assert [i for i, _ in tail] == [i for i, _ in full][1:]
        for (_, a), (_, b) in zip(full[1:], tail, strict=True):
            assert torch.equal(a["label"], b["label"])
    subset = stream(server.target, "weighted_file", batch_size=8, sampler={"kind": "subset"})
    assert len(subset) == 1 and subset[0][1]["label"].shape == (4,)


def test_count_batches_and_describe_report_the_sampler(server):
    assert count(server.target, "imbalanced", batch_size=1000).num_batches == 22
    subset = count(server.target, "weighted_file", batch_size=3, sampler={"kind": "subset"})
    assert (subset.num_batches, subset.num_samples, subset.sampler) == (2, 4, "subset")
    spread = count(server.target, "imbalanced", batch_size=10, rank=1, world_size=3)
    assert (spread.num_batches, spread.num_samples) == (734, 7334)  # ceil(22000 / 3)
    info = BatchClient(server.target).describe("imbalanced")
    assert (info.sampler.kind, info.sampler.num_samples) == ("weighted", 22000)
    assert list(info.transforms) == ["collate: default"]


def test_unconfigured_sampler_is_invalid_argument(server):
    with pytest.raises(ServerError) as info:
        batches(server.target, "imbalanced", batch_size=8, sampler={"kind": "subset"})
    assert info.value.code.name == "INVALID_ARGUMENT"
    assert "indices = FILE" in info.value.details
