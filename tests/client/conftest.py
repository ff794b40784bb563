"""Fixtures of the client tests: servers that a test may kill and restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _serverproc import ServerProcess, free_port
from client_support import RESUME_CONFIG


@pytest.fixture(scope="session")
def resume_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "resume.toml"
    path.write_text(RESUME_CONFIG)
    return path


@pytest.fixture
def killable_server(resume_config: Path) -> Iterator[ServerProcess]:
    """A server on a fixed port of its own, so that a restart comes back on the same target."""
    server = ServerProcess(resume_config, port=free_port(), workers=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()
