"""docker-compose.yml: validated, and every service's command run as a local process.

No Docker engine runs on CI machines, so the stack itself is exercised the
way compose would run it, minus the containers: the server's command and
environment, its healthcheck until healthy, then the trainer and the
loadtest against it. Inside compose the server is ``server:50051`` and binds
0.0.0.0; here it is 127.0.0.1 on free ports. Where a Docker engine is
reachable, the last test builds the image and runs the real stack.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _serverproc import batchwire_command, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_config(profile: str) -> dict:
    """``docker-compose --profile PROFILE config``, parsed (skips without docker-compose)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("BATCHWIRE_REQUIRE_COMPOSE"):
            pytest.fail("docker-compose is not installed (.ci/run installs Debian's package)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "--profile", profile, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid() -> None:
    resolved = compose_config("loadtest")
    # docker-compose 1.x lists every profile's services here.
    assert {"server", "trainer", "loadtest"} <= set(resolved["services"])


def test_compose_declares_the_stack(compose: dict) -> None:
    services = compose["services"]
    server, trainer, loadtest = services["server"], services["trainer"], services["loadtest"]
    assert server["command"][:2] == ["batchwire", "serve"]
    assert server["healthcheck"]["test"][1:3] == ["batchwire", "health"]
    assert int(server["shm_size"].rstrip("gb")) >= 1
    for dependent in (trainer, loadtest):
        assert dependent["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert "profiles" not in trainer  # `docker compose up` trains
    assert loadtest["profiles"] == ["loadtest"]
    assert loadtest["command"][:2] == ["batchwire", "bench"]


class LocalCompose:
    """Maps compose's view (host ``server``, fixed ports, 0.0.0.0) onto loopback and free ports."""

    def __init__(self) -> None:
        self.ports = {"50051": str(free_port()), "9090": str(free_port())}

    def arg(self, value: str) -> str:
        value = value.replace("0.0.0.0", "127.0.0.1")
        for host in ("server:", "localhost:"):
            value = value.replace(host, "127.0.0.1:")
        for port, local in self.ports.items():
            value = value.replace(port, local)
        return value

    def command(self, words: list[str]) -> list[str]:
        head = {"batchwire": batchwire_command(), "python": [sys.executable]}.get(words[0])
        return [*(head or [words[0]]), *(self.arg(w) for w in words[1:])]

    def env(self, service: dict) -> dict[str, str]:
        extra = {key: self.arg(str(value)) for key, value in service.get("environment", {}).items()}
        return {**os.environ, **extra}

    def run(self, service: dict, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(service["command"]),
            env=self.env(service),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def test_compose_services_run_as_local_processes(compose: dict, tmp_path: Path) -> None:
    services = compose["services"]
    local = LocalCompose()
    # A file, not a pipe: nobody reads a pipe until the end, and a full pipe
    # would block the server's log writes (as a real container's stdout does not).
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen(
        local.command(services["server"]["command"]),
        env=local.env(services["server"]),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        healthcheck = local.command(services["server"]["healthcheck"]["test"][1:])
        deadline = time.monotonic() + 120
        while subprocess.run(healthcheck, capture_output=True, timeout=60).returncode != 0:
            assert server.poll() is None, "the server exited before it was healthy"
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.5)

        trainer = local.run(services["trainer"], timeout=400)
        assert trainer.returncode == 0, trainer.stdout + trainer.stderr
        assert "test accuracy through batchwire" in trainer.stdout

        loadtest = local.run(services["loadtest"], timeout=120)
        assert loadtest.returncode == 0, loadtest.stdout + loadtest.stderr
        assert "batches/s" in loadtest.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        log.seek(0)
        output = log.read()
        log.close()
    assert server.returncode == 0, output
    assert "stream start" in output  # the INFO level from the compose environment


def _docker_engine():
    try:
        import docker
    except ImportError:
        return None, "the docker Python SDK is not installed"
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        return None, f"no Docker engine is reachable ({type(exc).__name__})"
    return client, ""


def test_image_builds_and_the_stack_trains() -> None:
    client, why = _docker_engine()
    if client is None:
        pytest.skip(why)
    compose_cli = (
        ["docker", "compose"]
        if shutil.which("docker")
        else [shutil.which("docker-compose") or "docker-compose"]
    )
    client.images.build(path=str(ROOT), tag="batchwire:latest", rm=True)
    up = subprocess.run(
        [*compose_cli, "-f", str(COMPOSE_FILE), "up", "--exit-code-from", "trainer"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    subprocess.run([*compose_cli, "-f", str(COMPOSE_FILE), "down"], cwd=ROOT, timeout=300)
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
    assert "test accuracy through batchwire" in up.stdout
