"""Generated stubs match the .proto; the package imports from a regular (non-editable) install."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path):
    generated = load_gen_protos().generate(tmp_path)
    committed = ROOT / "core" / "v1"
    names = sorted(p.name for p in generated.iterdir())
    assert names == ["batchwire_pb2.py", "batchwire_pb2.pyi", "batchwire_pb2_grpc.py"]
    for name in names:
        assert (generated / name).read_text() == (committed / name).read_text(), (
            f"core/v1/{name} is stale: run `python scripts/gen_protos.py` and commit the result"
        )


@pytest.mark.timeout(600)
def test_regular_install_imports_from_outside_the_repo(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    code = (
        "import batchwire, batchwire.client, batchwire.server, batchwire.v1.batchwire_pb2, batchwire.cli;"
        "print(batchwire.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target))
    # Nothing is importable under the bare folder names.
    bare = subprocess.run(
        [sys.executable, "-c", "import server"],
        cwd=tmp_path,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert bare.returncode != 0


def test_client_does_not_load_server_code():
    code = "import sys, batchwire.client; assert not any(m.startswith('batchwire.server') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_public_exports_are_pinned():
    import batchwire.client
    import batchwire.server

    assert batchwire.client.__all__ == [
        "BatchClient",
        "BatchwireError",
        "ConnectError",
        "DevicePrefetcher",
        "FingerprintMismatch",
        "RemoteDataset",
        "RetryError",
        "RetryPolicy",
        "ServerError",
        "StreamStats",
        "TargetError",
        "TransportError",
        "enable_metrics",
    ]
    assert batchwire.server.__all__ == ["BatchwireServer", "Config", "ConfigError", "load_config"]
