"""A bad config stops ``batchwire serve`` at start-up with the file, the key and the reason."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from _serverproc import batchwire_command

SYNTHETIC = '[datasets.s]\nsource = "synthetic"\nlength = 4\nfields.x = { shape = [2] }\n'

CASES = {
    "missing key": (
        '[datasets.s]\nsource = "synthetic"\nfields.x = { shape = [2] }\n',
        "datasets.s.length",
        "required key is missing",
    ),
    "wrong type": (
        '[datasets.s]\nsource = "synthetic"\nlength = "ten"\nfields.x = { shape = [2] }\n',
        "datasets.s.length",
        "expected integer, got string 'ten'",
    ),
    "bad value": (
        '[datasets.s]\nsource = "synthetic"\nlength = -3\nfields.x = { shape = [2] }\n',
        "datasets.s.length",
        "expected a positive integer, got -3",
    ),
    "unknown executor": (
        '[server]\nexecutor = "dask"\n' + SYNTHETIC,
        "server.executor",
        "unknown value 'dask'; expected one of local",
    ),
    "unknown source": (
        '[datasets.s]\nsource = "parqet"\n',
        "datasets.s.source",
        "unknown source 'parqet'",
    ),
    "missing file": (
        '[datasets.a]\nsource = "arrays"\nfiles = { x = "nope.npy" }\n',
        "datasets.a.files.x",
        "file not found",
    ),
    "unimportable factory": (
        '[datasets.p]\nsource = "python"\nfactory = "no_such_module_xyz:make"\n',
        "datasets.p.factory",
        "cannot import module 'no_such_module_xyz'",
    ),
    "missing attribute": (
        '[datasets.p]\nsource = "python"\nfactory = "json:no_such_function"\n',
        "datasets.p.factory",
        "has no attribute 'no_such_function'",
    ),
    "negative plan cache": (
        "[server]\nplan_cache_bytes = -1\n" + SYNTHETIC,
        "server.plan_cache_bytes",
        "expected a non-negative integer, got -1",
    ),
    "negative shared builds": (
        "[server]\nshared_builds_bytes = -5\n" + SYNTHETIC,
        "server.shared_builds_bytes",
        "expected a non-negative integer, got -5",
    ),
    "unknown server key": ("[server]\nwrokers = 2\n" + SYNTHETIC, "server.wrokers", "unknown key"),
    "bad dtype": (
        '[datasets.s]\nsource = "synthetic"\nlength = 4\nfields.x = { shape = [2], dtype = "complex64" }\n',
        "datasets.s.fields.x.dtype",
        "unknown value 'complex64'",
    ),
    "no datasets": ("[server]\nworkers = 1\n", "datasets", "required key is missing"),
    "not toml": ("[datasets.s\n", "", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_at_start_up(tmp_path, case):
    text, key, reason = CASES[case]
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr
    assert f": {key}: " in result.stderr or not key
    assert reason in result.stderr


def test_arrays_with_different_lengths_are_rejected(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 2)))
    np.save(tmp_path / "y.npy", np.zeros(4))
    config = tmp_path / "bad.toml"
    config.write_text('[datasets.a]\nsource = "arrays"\nfiles = { x = "x.npy", y = "y.npy" }\n')
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "datasets.a.files" in result.stderr and "first dimension" in result.stderr


def test_missing_config_file(tmp_path):
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "config file not found" in result.stderr


BAD_LENGTHS = """
class Sized:
    def __init__(self, length):
        self.length = length

    def __len__(self):
        if self.length == "raise":
            raise RuntimeError("index file is gone")
        return self.length

    def __getitem__(self, index):
        return index
"""


@pytest.mark.parametrize(
    ("length", "reason"),
    [
        ('"raise"', "RuntimeError: index file is gone"),
        ('"ten"', "'str' object cannot be interpreted as an integer"),
        ("2.5", "'float' object cannot be interpreted as an integer"),
        ("-3", "__len__() should return >= 0"),
    ],
)
def test_a_dataset_whose_len_fails_is_named(tmp_path, length, reason):
    (tmp_path / "bad_lengths.py").write_text(BAD_LENGTHS)
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[server]\npython_path = ["."]\n\n[datasets.p]\nsource = "python"\n'
        f'factory = "bad_lengths:Sized"\nkwargs = {{ length = {length} }}\n'
    )
    stderr = _serve_fails(config)
    assert f"{config}: datasets.p: " in stderr
    assert "len(" in stderr and reason in stderr


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('source = "arrays"\nfiles = { x = "empty.npy" }', "datasets.d.files.x"),
        ('source = "timeseries"\npath = "empty.npy"\nlength = 2', "datasets.d.path"),
        (
            'source = "synthetic"\nlength = 4\nfields.x = { shape = [2] }\n'
            'sampler = { kind = "weighted", weights = "empty.npy" }',
            "datasets.d.sampler.weights",
        ),
    ],
)
def test_an_empty_npy_file_is_named(tmp_path, table, key):
    (tmp_path / "empty.npy").write_bytes(b"")
    config = tmp_path / "bad.toml"
    config.write_text(f"[datasets.d]\n{table}\n")
    stderr = _serve_fails(config)
    assert f"{config}: {key}: " in stderr
    assert "empty.npy" in stderr and "0 bytes" in stderr


def _serve_fails(config) -> str:
    """``serve`` exits 2 with one message (no traceback); returns stderr."""
    result = subprocess.run(
        [*batchwire_command(), "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr
