"""The ``batchwire`` command as a user meets it: fast, actionable errors and the usual conventions.

Real processes only: the CLI in a subprocess, a closed port (nothing listens), a
real listener that occupies a port or accepts and never answers. Time bounds are
generous (process start-up imports torch, and the machine may be busy); the
errors they bound used to take ~32 s.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serverproc import ServerProcess, batchwire_command, free_port

# A failing command must end well before the ~32 s it took (DEADLINE_EXCEEDED).
BOUND_SECONDS = 20.0


def run(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [*batchwire_command(), *args], capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - started


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never says a word (not a gRPC server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


# -- point 4: connection errors ---------------------------------------------------------


@pytest.mark.parametrize("command", [["ls"], ["inspect", "dict"]])
def test_no_server_is_reported_quickly(command: list[str]) -> None:
    target = f"127.0.0.1:{free_port()}"  # a closed port: nothing listens
    result, seconds = run(*command, "--target", target)
    assert result.returncode == 1, result.stderr
    assert f"cannot reach {target}: is 'batchwire serve' running there?" in result.stderr
    assert "Connection refused" in result.stderr  # the reason, from gRPC
    assert "Traceback" not in result.stderr
    assert seconds < BOUND_SECONDS, seconds


def test_a_port_that_is_not_batchwire_is_reported_quickly(silent_listener: int) -> None:
    target = f"127.0.0.1:{silent_listener}"
    result, seconds = run("ls", "--target", target)
    assert result.returncode == 1, result.stderr
    assert f"cannot reach {target}: is 'batchwire serve' running there?" in result.stderr
    assert seconds < BOUND_SECONDS, seconds


def test_connect_timeout_is_configurable() -> None:
    target = f"127.0.0.1:{free_port()}"
    result, _ = run("ls", "--target", target, "--connect-timeout", "1.5")
    assert result.returncode == 1
    assert "no connection within 1.5s" in result.stderr


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("localhost", "it has no port"),
        ("grpc://127.0.0.1:50051", "'grpc' is not a scheme gRPC knows"),
        ("::1:50051", "an IPv6 address needs brackets"),
        ("localhost:http", "'http' is not a port"),
    ],
)
def test_a_target_that_cannot_be_parsed_is_refused_at_once(target: str, why: str) -> None:
    result, seconds = run("ls", "--target", target)
    assert result.returncode == 2, result.stderr
    assert f"bad target {target!r}: {why}" in result.stderr
    assert "a target looks like host:port (localhost:50051)" in result.stderr
    assert seconds < BOUND_SECONDS, seconds


def test_grpc_target_names_are_accepted(core_server: ServerProcess) -> None:
    port = core_server.port
    for target in (f"dns:///127.0.0.1:{port}", f"ipv4:127.0.0.1:{port}"):
        result, _ = run("ls", "--target", target)
        assert result.returncode == 0, result.stderr
        assert "dict" in result.stdout


def test_serve_on_a_port_in_use_exits_1_without_a_traceback(core_config: Path) -> None:
    with socket.socket() as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen(1)
        port = occupier.getsockname()[1]
        result, seconds = run("serve", "--config", str(core_config), "--port", str(port))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {port} is in use (pick another, or --port 0)" in result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < BOUND_SECONDS, seconds


# -- point 5: conventions ------------------------------------------------------------


def test_version() -> None:
    from importlib.metadata import version

    result, _ = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"batchwire {version('batchwire')}"


def test_global_options_are_accepted_after_the_subcommand(core_server: ServerProcess) -> None:
    result, _ = run("ls", "--target", core_server.target, "--log-level", "DEBUG")
    assert result.returncode == 0, result.stderr
    assert f"DEBUG batchwire.client._channel: connected to {core_server.target}" in result.stderr


def test_log_level_before_and_after_the_subcommand() -> None:
    from batchwire.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--log-level", "info", "ls"]).log_level == "INFO"
    assert parser.parse_args(["ls", "--log-level", "error"]).log_level == "ERROR"
    assert parser.parse_args(["--log-level", "info", "ls", "--log-level", "debug"]).log_level == (
        "DEBUG"
    )
    assert parser.parse_args(["serve", "--config", "x", "--log-level", "warning"]).log_level == (
        "WARNING"
    )


@pytest.mark.parametrize(("flag", "value"), [("--workers", "0"), ("--workers", "-2")])
def test_serve_refuses_a_worker_count_below_one(core_config: Path, flag: str, value: str) -> None:
    result, _ = run("serve", "--config", str(core_config), "--port", "0", flag, value)
    assert result.returncode == 2
    assert f"argument --workers: should be an integer >= 1, but got '{value}'" in result.stderr


def test_ls_prints_a_header_row(core_server: ServerProcess) -> None:
    result, _ = run("ls", "--target", core_server.target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["DATASET", "SOURCE", "SAMPLES", "FIELDS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["dict"][1:3] == ["python", "103"]
    assert lines[0].index("SOURCE") == lines[1].index(rows[lines[1].split()[0]][1])  # aligned


def test_an_unimportable_factory_names_python_path_and_the_folders_searched(
    tmp_path: Path,
) -> None:
    (tmp_path / "mods").mkdir()
    config = tmp_path / "bad.toml"
    config.write_text(
        '[server]\npython_path = ["mods", "missing"]\n\n'
        '[datasets.p]\nsource = "python"\nfactory = "absent_module:make"\n'
    )
    result, _ = run("serve", "--config", str(config), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "cannot import module 'absent_module'" in result.stderr
    assert "python_path" in result.stderr
    assert str(tmp_path / "mods") in result.stderr
    assert f"{tmp_path / 'missing'} (no such folder)" in result.stderr


@pytest.mark.parametrize("workers", [0, -1, True])
def test_the_server_class_refuses_a_worker_count_below_one(core_config: Path, workers) -> None:
    # Before: BatchwireServer(config, workers=0) silently used the config's count.
    from batchwire.server.app import BatchwireServer
    from batchwire.server.config import load_config

    with pytest.raises(
        ValueError, match=f"workers should be a positive integer, but got workers={workers!r}"
    ):
        BatchwireServer(load_config(core_config), workers=workers)
