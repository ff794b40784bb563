"""Worker fast paths through a real server: ``__getitems__`` once per batch, as DataLoader
calls it; batches collated straight into kept payload files, workers sharing them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import getitems_data
import pytest
from _serverproc import ServerProcess
from conftest import assert_same_batch
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from batchwire.client import RemoteDataset, ServerError

HERE = Path(__file__).resolve().parent
CROP = 'transforms.image = [{ name = "RandomCrop", size = 5 }]'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("getitems") / "server.toml"
    config.write_text(
        f"""
[server]
python_path = ["{HERE}"]

[datasets.batched]
source = "python"
factory = "getitems_data:batched_only"
kwargs = {{ length = 45 }}

[datasets.batched_cropped]
source = "python"
factory = "getitems_data:batched_only"
kwargs = {{ length = 45 }}
{CROP}

[datasets.rows_cropped]
source = "python"
factory = "getitems_data:rows"
kwargs = {{ length = 45 }}
{CROP}

[datasets.many]
source = "python"
factory = "getitems_data:rows"
kwargs = {{ length = 200 }}

[datasets.broken]
source = "python"
factory = "getitems_data:broken_batch"
kwargs = {{ length = 45, bad_index = 13 }}
"""
    )
    with ServerProcess(config, workers=2) as process:
        yield process


def _remote(server: ServerProcess, name: str, **options) -> list:
    return list(RemoteDataset(server.target, name, batch_size=8, shuffle=True, seed=5, **options))


def test_batches_equal_dataloaders_which_also_calls_getitems(server: ServerProcess) -> None:
    dataset = getitems_data.batched_only(45)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=5)
    expected = list(DataLoader(dataset, batch_size=8, sampler=sampler))
    actual = _remote(server, "batched")
    assert len(actual) == len(expected) == 6
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_same_batch(a, e, f"batch {i}")


def test_per_item_transforms_run_after_getitems_as_after_getitem(server: ServerProcess) -> None:
    batched, single = _remote(server, "batched_cropped"), _remote(server, "rows_cropped")
    assert len(batched) == len(single) == 6
    assert batched[0]["image"].shape == (8, 3, 5, 5)
    for i, (a, e) in enumerate(zip(batched, single, strict=True)):
        assert_same_batch(a, e, f"batch {i}")


def test_a_failing_getitems_names_its_batch(server: ServerProcess) -> None:
    received = []
    with pytest.raises(ServerError) as caught:
        for batch in RemoteDataset(server.target, "broken", batch_size=8):
            received.append(batch)
    assert "'broken', the batch starting at sample index 8" in caught.value.details
    assert "OSError: the batch read failed" in caught.value.details
    assert [batch["label"].tolist() for batch in received] == [list(range(8))]


def test_workers_taking_turns_on_kept_files_neither_crash_nor_mix_batches(
    server: ServerProcess,
) -> None:
    # 25 batches of 8, in tasks of up to 16: each epoch's last task is shorter and cuts
    # its file, which the other worker may have mapped longer (was a SIGBUS, and the
    # pool quietly rebuilt the batches on a new worker). Over gRPC, files are recycled
    # from one stream to the next.
    dataset = getitems_data.rows(200)
    remote = RemoteDataset(server.target, "many", batch_size=8, transport="grpc")
    for epoch in range(20):
        remote.set_epoch(epoch)
        batches = list(remote)
        assert len(batches) == 25
        for i in (0, 24):
            expected = default_collate([dataset[k] for k in range(8 * i, 8 * i + 8)])
            assert_same_batch(batches[i], expected, f"epoch {epoch} batch {i}")
    assert not [line for line in server.output if "died with exit code" in line]
