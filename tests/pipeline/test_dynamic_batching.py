"""Dynamic batching and padding collation through a real server.

Variable-length sequences batched up to a token budget: no batch exceeds it,
every sample appears exactly once per epoch, and ranks are disjoint; the pad
collate pads with the configured value and sends the lengths.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _serverproc import ServerProcess
from pipeline_data import VariableSequences, batches, count, stream

from batchwire.client import BatchClient, RemoteDataset, ServerError

HERE = Path(__file__).resolve().parent
LENGTH = 97

CONFIG = f"""
[server]
python_path = ["{HERE}"]

[datasets.seqs]
source = "python"
factory = "pipeline_data:variable_sequences"
kwargs = {{ length = {LENGTH} }}
collate = {{ kind = "pad", fields = ["tokens"], padding_value = -1 }}
sampler = {{ kind = "dynamic", length_field = "tokens", max_tokens = 40 }}

[datasets.noisy]
source = "python"
factory = "pipeline_data:slow_range"
kwargs = {{ length = 12, delay = 0.0 }}
transforms = [{{ name = "pipeline_data:add_noise" }}]
collate = "pipeline_data:sum_collate"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("dynamic") / "dynamic.toml"
    path.write_text(CONFIG)
    with ServerProcess(path, workers=2) as server:
        yield server


def check_padded(batch: dict[str, torch.Tensor]) -> list[int]:
    """Checks one padded batch; returns its sample indices."""
    tokens, lengths, labels = batch["tokens"], batch["tokens_lengths"], batch["label"]
    assert tokens.shape == (len(labels), int(lengths.max()))
    for row, length, label in zip(tokens, lengths.tolist(), labels.tolist(), strict=True):
        assert length == VariableSequences.size(label)
        assert (row[:length] == label).all() and (row[length:] == -1).all()
    return labels.tolist()


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("max_tokens", [13, 40])
def test_budget_is_kept_every_sample_once_and_ranks_disjoint(server, world_size, max_tokens):
    seen: list[list[int]] = []
    for rank in range(world_size):
        fields = dict(
            batch_size=64,
            shuffle=True,
            seed=7,
            epoch=2,
            rank=rank,
            world_size=world_size,
            sampler={"kind": "dynamic", "max_tokens": max_tokens},
        )
        indices: list[int] = []
        got = stream(server.target, "seqs", **fields)
        for _, batch in got:
            assert int(batch["tokens_lengths"].sum()) <= max_tokens
            indices += check_padded(batch)
        seen.append(indices)
        counted = count(server.target, "seqs", **fields)
        assert (counted.num_batches, counted.num_samples) == (len(got), len(indices))
        assert counted.sampler == "dynamic"
    everything = [i for share in seen for i in share]
    assert sorted(everything) == list(range(LENGTH))  # once each, so ranks are disjoint
    counts = [len(share) for share in seen]
    assert max(counts) - min(counts) <= max_tokens  # at most one batch apart


def test_dynamic_is_the_configured_default_and_deterministic(server):
    # No sampler in the request: the config's dynamic sampler with max_tokens = 40.
    first = batches(server.target, "seqs", batch_size=64, shuffle=True, seed=1, epoch=0)
    again = batches(server.target, "seqs", batch_size=64, shuffle=True, seed=1, epoch=0)
    other = batches(server.target, "seqs", batch_size=64, shuffle=True, seed=1, epoch=1)
    labels = lambda bs: [b["label"].tolist() for b in bs]  # noqa: E731
    assert labels(first) == labels(again) != labels(other)
    assert all(int(b["tokens_lengths"].sum()) <= 40 for b in first)
    sizes = {len(b["label"]) for b in first}
    assert len(sizes) > 1  # batches really vary in size


def test_item_budget_and_resume(server):
    fields = dict(batch_size=64, seed=4, sampler={"kind": "dynamic", "max_items": 5})
    full = stream(server.target, "seqs", **fields)
    assert all(len(b["label"]) <= 5 for _, b in full)
    tail = stream(server.target, "seqs", start_batch=4, **fields)
    assert [i for i, _ in tail] == list(range(4, len(full)))
    for (_, a), (_, b) in zip(full[4:], tail, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])


def test_describe_shows_the_padded_fields(server):
    info = BatchClient(server.target).describe("seqs")
    fields = {f.name: list(f.shape) for f in info.fields}
    assert fields == {"tokens": [1], "tokens_lengths": [], "label": []}
    assert info.sampler.kind == "dynamic" and info.sampler.max_tokens == 40
    assert "collate: pad(fields=['tokens'], padding_value=-1.0)" in list(info.transforms)


def test_a_sample_over_the_budget_is_invalid_argument(server):
    with pytest.raises(ServerError) as info:
        batches(server.target, "seqs", batch_size=8, sampler={"kind": "dynamic", "max_tokens": 5})
    assert info.value.code.name == "INVALID_ARGUMENT"
    assert "more than max_tokens=5" in info.value.details


def test_remote_dataset_streams_dynamic_batches(server):
    remote = RemoteDataset(
        server.target, "seqs", batch_size=64, sampler={"kind": "dynamic", "max_tokens": 30}
    )
    expected_batches = len(remote)  # CountBatches: exact for dynamic batching too
    got = list(remote)
    assert len(got) == expected_batches
    labels = [i for batch in got for i in check_padded(batch)]
    assert sorted(labels) == list(range(LENGTH))


def test_collate_and_random_transform_by_import_path(server):
    first = batches(server.target, "noisy", batch_size=4, seed=3)
    again = batches(server.target, "noisy", batch_size=4, seed=3)
    other = batches(server.target, "noisy", batch_size=4, seed=4)
    assert list(first[0]) == ["stacked", "total"]
    assert torch.equal(first[0]["total"], first[0]["stacked"].sum(0))
    base = torch.tensor([[i, i * i] for i in range(4)], dtype=torch.float32)
    noise = first[0]["stacked"] - base
    assert ((noise >= 0) & (noise < 1)).all()
    assert torch.equal(first[0]["stacked"], again[0]["stacked"])
    assert not torch.equal(first[0]["stacked"], other[0]["stacked"])
