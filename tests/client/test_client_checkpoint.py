"""A checkpoint taken inside the training loop names the first batch the loop has not received.

Whatever reads ahead between the stream and the loop (DevicePrefetcher depth,
parallel streams, the streams' own buffers), a trainer killed after N batches
and resumed from its last checkpoint trains every batch exactly once, in order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _serverproc import ServerProcess
from client_support import CLIENT_TESTS_DIR

from batchwire.client import DevicePrefetcher, RemoteDataset

ROOT = Path(__file__).resolve().parents[2]
LENGTH, BATCH, EPOCHS = 61, 8, 2  # 8 batches per epoch, the last one short
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIG = f"""
[server]
python_path = ["{CLIENT_TESTS_DIR.parent}", "{CLIENT_TESTS_DIR}"]

[datasets.pairs]
source = "python"
factory = "slow_datasets:indexed_pair"
kwargs = {{ length = {LENGTH} }}
"""


class Killed(Exception):
    """The trainer's process died here."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("checkpoint") / "pairs.toml"
    config.write_text(CONFIG)
    with ServerProcess(config, workers=2) as server:
        yield server


def dataset(target: str, streams: int) -> RemoteDataset:
    return RemoteDataset(target, "pairs", batch_size=BATCH, shuffle=True, seed=5, streams=streams)


@pytest.fixture(scope="module")
def uninterrupted(server: ServerProcess) -> list[list[int]]:
    ds = dataset(server.target, 1)
    return [y.tolist() for _ in range(EPOCHS) for _, y in ds]


def train(
    target: str, depth: int, streams: int, checkpoint: dict, kill_after: int | None
) -> list[list[int]]:
    """The README's loop; returns the batches it trained (their sample indices)."""
    trained: list[list[int]] = []
    ds = dataset(target, streams)
    batches = DevicePrefetcher(ds, DEVICE, depth=depth)
    if checkpoint:
        batches.load_state_dict(checkpoint["data"])
    for epoch in range(ds.epoch, EPOCHS):
        ds.set_epoch(epoch)
        for _, y in batches:
            trained.append(y.tolist())
            checkpoint["data"] = json.loads(json.dumps(batches.state_dict()))
            if len(trained) == kill_after:
                raise Killed
    return trained


@pytest.mark.parametrize("streams", [1, 2, 3, 4])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_killed_and_resumed_trains_every_batch_once_in_order(
    server: ServerProcess, uninterrupted: list[list[int]], depth: int, streams: int
):
    # Mid-epoch, on the epoch's last batch, and early in the next epoch.
    for kill_after in (3, 8, 11):
        checkpoint: dict = {}
        with pytest.raises(Killed):
            train(server.target, depth, streams, checkpoint, kill_after)
        first = uninterrupted[:kill_after]
        rest = train(server.target, depth, streams, checkpoint, None)
        assert first + rest == uninterrupted, f"killed after {kill_after} batches"


def test_state_before_and_after_a_pass_is_the_datasets(server: ServerProcess):
    ds = dataset(server.target, 1)
    batches = DevicePrefetcher(ds, DEVICE, depth=3)
    assert batches.state_dict() == ds.state_dict()
    for _ in batches:
        pass
    assert batches.state_dict() == ds.state_dict()
    assert (batches.state_dict()["epoch"], batches.state_dict()["batch"]) == (1, 0)


def test_cpu_prefetcher_reads_ahead_by_its_depth():
    pulled = []

    def source():
        for i in range(10):
            pulled.append(i)
            yield {"i": torch.tensor(i)}

    for depth in (1, 3):
        pulled.clear()
        for n, batch in enumerate(DevicePrefetcher(source(), "cpu", depth=depth)):
            assert batch["i"].item() == n
            # While the loop holds batch n, batches up to n + depth - 1 are in flight.
            assert len(pulled) == min(n + depth, 10)


def readme_checkpoint_code() -> str:
    """The README's trainer-side code block (the one that checkpoints)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    found = [b for b in blocks if "state_dict()" in b and "DevicePrefetcher" in b]
    assert len(found) == 1, "expected one README code block that checkpoints a DevicePrefetcher"
    return found[0]


def substitute(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"README code block: expected {old!r} once"
    return code.replace(old, new)


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_the_readme_checkpoint_code_resumes_exactly(
    server: ServerProcess, uninterrupted: list[list[int]], depth: int, streams: int
):
    code = readme_checkpoint_code()
    for old, new in (
        ('"localhost:50051"', repr(server.target)),
        ('"digits"', '"pairs"'),
        ("batch_size=64", f"batch_size={BATCH}"),
        ("shuffle=True,", "shuffle=True, seed=5,"),
        ("streams=1", f"streams={streams}"),
        ("depth=2", f"depth={depth}"),
        ('"cuda"', repr(DEVICE)),
    ):
        code = substitute(code, old, new)
    trained: list[list[int]] = []
    kill_after = 5

    def train_step(x, y):
        assert x.device.type == DEVICE and torch.equal(x[:, 0].long().cpu(), y.cpu())
        trained.append(y.tolist())

    def save(checkpoint):
        if len(trained) == kill_after:
            raise Killed

    checkpoint: dict = {}
    names = {"checkpoint": checkpoint, "epochs": EPOCHS, "train_step": train_step, "save": save}
    with pytest.raises(Killed):
        exec(compile(code, "README.md", "exec"), dict(names))
    saved = json.loads(json.dumps(checkpoint))  # as torch.save/json would keep it
    exec(compile(code, "README.md", "exec"), {**names, "checkpoint": saved, "save": lambda c: None})
    assert trained == uninterrupted[:kill_after] + uninterrupted[kill_after:]
    assert len(trained) == len(uninterrupted)
