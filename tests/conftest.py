"""Shared fixtures: a real ``batchwire serve`` process on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _serverproc import ServerProcess

TESTS_DIR = Path(__file__).resolve().parent

CORE_CONFIG = f"""
[server]
python_path = ["{TESTS_DIR}"]
max_batch_size = 1024
chunk_bytes = 1048576

[datasets.dict]
source = "python"
factory = "sample_datasets:indexed_dict"
kwargs = {{ length = 103 }}

[datasets.tuple]
source = "python"
factory = "sample_datasets:indexed_tuple"
kwargs = {{ length = 50 }}

[datasets.failing]
source = "python"
factory = "sample_datasets:failing"
kwargs = {{ length = 40, bad_index = 13 }}

[datasets.big]
source = "synthetic"
length = 24
seed = 7
fields.image = {{ shape = [1024, 1024], dtype = "float32" }}
fields.label = {{ shape = [], dtype = "int64", high = 10 }}
"""


@pytest.fixture(scope="session")
def core_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "core.toml"
    path.write_text(CORE_CONFIG)
    return path


@pytest.fixture(scope="session")
def core_server(core_config: Path) -> Iterator[ServerProcess]:
    with ServerProcess(core_config, workers=2) as server:
        yield server


def assert_same_batch(actual: Any, expected: Any, where: str = "batch") -> None:
    """Same structure (container types, keys), same dtypes, shapes and values."""
    assert type(actual) is type(expected), (
        f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    )
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, (
            f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
        assert torch.equal(actual, expected), f"{where}: values differ"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same_batch(actual[key], expected[key], f"{where}[{key!r}]")
    else:
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_batch(a, e, f"{where}[{i}]")


@pytest.fixture(autouse=True)
def _no_stream_threads_left() -> Iterator[None]:
    """A client pass that a test leaves open keeps threads inside grpc; a DataLoader that
    forks later in the run may then crash far from the cause. Fails the test that leaked."""
    yield
    deadline = time.monotonic() + 10
    while left := [t.name for t in threading.enumerate() if t.name.startswith("batchwire-stream")]:
        assert time.monotonic() < deadline, f"client stream threads left running: {left}"
        time.sleep(0.05)


@pytest.fixture(autouse=True, scope="module")
def _close_client_channels() -> Iterator[None]:
    """Each module's channels are closed after it: replica lists' health watches and
    channels to stopped servers would otherwise stay busy inside grpc for the rest of
    the run, under every later DataLoader fork (a worker's calls then time out)."""
    yield
    from batchwire.client._channel import close_channels

    close_channels()
