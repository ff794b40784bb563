"""Issue 13 (1-3) without servers: replica targets, the dataset fingerprint, connection age."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from _serverproc import free_port

from batchwire.client import BatchClient, ConnectError, TargetError
from batchwire.client._targets import grpc_target
from batchwire.server import fingerprint
from batchwire.server.app import connection_age_options
from batchwire.server.config import ConfigError, DatasetConfig, load_config

# -- targets ----------------------------------------------------------------------------------


def test_a_list_of_replicas_is_one_balanced_grpc_target():
    assert grpc_target("127.0.0.1:5000") == "127.0.0.1:5000"
    both = "ipv4:127.0.0.1:5000,127.0.0.2:5001"
    assert grpc_target(["127.0.0.1:5000", "127.0.0.2:5001"]) == both
    assert grpc_target("127.0.0.1:5000, 127.0.0.2:5001") == both  # BATCHWIRE_TARGET style
    assert grpc_target(("localhost:5000", "127.0.0.2:5001")) == both  # names resolved once
    assert grpc_target(["[::1]:5000", "[::1]:5001"]) == "ipv6:[::1]:5000,[::1]:5001"
    assert grpc_target(["127.0.0.1:5000"]) == "127.0.0.1:5000"
    for name in ("dns:///data.ns.svc:50051", "ipv4:10.0.0.5:50051,10.0.0.6:50051"):
        assert grpc_target(name) == name  # gRPC names as they are


@pytest.mark.parametrize(
    ("target", "says"),
    [
        (["127.0.0.1:5000", "127.0.0.1"], r"entry 1 \('127.0.0.1'\).*no port"),
        ("127.0.0.1:5000,grpc://x:1", r"entry 1 \('grpc://x:1'\)"),
        (["127.0.0.1:5000", "dns:///x:1"], r"entry 1 .*not host:port"),
        ([], "empty"),
        (["127.0.0.1:5000", 5001], r"entry 1 \(5001\)"),
    ],
)
def test_a_bad_entry_of_a_list_is_named(target, says):
    with pytest.raises(TargetError, match=says):
        BatchClient(target)


def test_replicas_that_cannot_be_reached_are_named():
    ports = [free_port(), free_port()]
    targets = [f"127.0.0.1:{port}" for port in ports]
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        BatchClient(targets, connect_timeout=1.0).describe("x")
    assert time.monotonic() - started < 30  # bounds a hang only
    assert f"cannot reach {targets[0]}, {targets[1]}:" in str(info.value)


# -- the dataset fingerprint -------------------------------------------------------------------

DATASET = DatasetConfig(
    "images",
    "image_folder",
    {"root": "data/images", "extensions": [".jpg"]},
    {
        "transforms": {"image": ["ToTensor", {"name": "Normalize", "mean": [0.5], "std": [0.2]}]},
        "collate": "default",
        "sampler": {"kind": "weighted", "weights": "w.npy", "num_samples": 100},
    },
)


def test_the_fingerprint_is_stable_across_processes():
    ours = fingerprint.dataset_fingerprint(DATASET, 29)
    code = (
        "from batchwire.server.config import DatasetConfig\n"
        "from batchwire.server.fingerprint import dataset_fingerprint\n"
        # Keys in another order: the same config.
        f"print(dataset_fingerprint(DatasetConfig('images', 'image_folder', "
        f"{dict(reversed(DATASET.options.items()))!r}, {dict(reversed(DATASET.pipeline.items()))!r}), 29))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == ours
    assert ours.startswith("sha256:") and len(ours) == len("sha256:") + 64


@pytest.mark.parametrize(
    "change",
    [
        {"source": "arrays"},
        {"options": {"root": "data/other", "extensions": [".jpg"]}},
        {"transforms": {"image": ["ToTensor"]}},
        {"collate": "pad"},
        {"sampler": {"kind": "weighted", "weights": "w.npy", "num_samples": 101}},
        {"sampler": {"kind": "distributed", "weights": "w.npy", "num_samples": 100}},
        {"length": 30},
        {"wire": "batchwire.v2"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_the_fingerprint_changes_with_whatever_determines_the_bytes(change, monkeypatch):
    before = fingerprint.dataset_fingerprint(DATASET, 29)
    source, options, pipeline = DATASET.source, DATASET.options, dict(DATASET.pipeline)
    length = change.get("length", 29)
    source = change.get("source", source)
    options = change.get("options", options)
    for key in ("transforms", "collate", "sampler"):
        if key in change:
            pipeline[key] = change[key]
    if "wire" in change:
        monkeypatch.setattr(fingerprint, "WIRE_VERSION", change["wire"])
    changed = DatasetConfig(DATASET.name, source, options, pipeline)
    assert fingerprint.dataset_fingerprint(changed, length) != before


# -- connection age -------------------------------------------------------------------------


def test_max_connection_age_is_read_and_passed_to_grpc(tmp_path: Path):
    path = tmp_path / "age.toml"
    body = '[datasets.d]\nsource = "synthetic"\nlength = 4\nfields.x = { shape = [], dtype = "int64" }\n'
    path.write_text(body)
    assert connection_age_options(load_config(path).server) == []  # 0: off, the default
    path.write_text(
        "[server]\nmax_connection_age_seconds = 5\nmax_connection_age_grace_seconds = 1.5\n" + body
    )
    assert connection_age_options(load_config(path).server) == [
        ("grpc.max_connection_age_ms", 5000),
        ("grpc.max_connection_age_grace_ms", 1500),
    ]
    path.write_text("[server]\nmax_connection_age_seconds = -1\n" + body)
    with pytest.raises(ConfigError, match=r"server\.max_connection_age_seconds"):
        load_config(path)
