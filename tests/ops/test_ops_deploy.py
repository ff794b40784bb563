"""Issue 13.5: deploy/kubernetes/ and ``docker compose up --scale server=3``.

No cluster and no Docker engine run here, so the manifests are checked for
structure (selectors, ports, probes, security) and every container command is
run the way the cluster would run it, minus the containers: the Deployment's
server command once per replica, its probes until ready, then the trainer
Job's command. Inside the cluster each replica binds 0.0.0.0:50051 in its own
pod and the trainer resolves ``dns:///batchwire-hl.<ns>.svc.cluster.local:50051``
to every ready replica. Here replica i binds 127.0.0.i+1 (all of 127/8 is
loopback) on one free port, and the trainer's target is the same name
resolved by a DNS server on loopback (tests/replicas/dns_stub.py) to those
addresses. The ConfigMap's files lie in a folder, and the image's working
directory /app is this checkout. The compose service ``server`` is run three
times the same way (``--scale server=3``: compose's DNS answers ``server``
with every replica).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml
from _serverproc import batchwire_command, free_port

from batchwire.cli import build_parser
from batchwire.client._channel import check_target
from batchwire.server.config import load_config

# tests/replicas' DNS server on loopback, which resolves one name to every replica.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "replicas"))
from dns_stub import DnsStub

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
COMPOSE_FILE = ROOT / "docker-compose.yml"
IMAGE_WORKDIR = "/app"


# -- the manifests ----------------------------------------------------------------


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    """Every object of deploy/kubernetes/*.yaml but the kustomization, by kind."""
    found: dict[str, dict] = {}
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"{path.name}: a second {doc['kind']}"
            found[doc["kind"]] = doc
    assert set(found) == {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Job",
    }
    return found


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict) -> dict:
    (only,) = pod_spec(obj)["containers"]
    return only


def container_ports(obj: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(obj)["ports"]}


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_kustomization_applies_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_one_namespace_and_labels(objects: dict[str, dict]) -> None:
    namespace = objects["Namespace"]["metadata"]["name"]
    for kind, obj in objects.items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, kind


def test_selectors_match_the_server_pods_only(objects: dict[str, dict]) -> None:
    deployment, service, pdb, job = (
        objects[k] for k in ("Deployment", "Service", "PodDisruptionBudget", "Job")
    )
    selector = deployment["spec"]["selector"]["matchLabels"]
    server_labels = deployment["spec"]["template"]["metadata"]["labels"]
    trainer_labels = job["spec"]["template"]["metadata"]["labels"]

    def selects(wanted: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in wanted.items())

    for chooser in (selector, service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selects(chooser, server_labels)
        assert not selects(chooser, trainer_labels)  # trainers are never replicas
    assert deployment["spec"]["replicas"] >= 2
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_the_service_is_headless_and_its_ports_agree(objects: dict[str, dict]) -> None:
    service, deployment = objects["Service"], objects["Deployment"]
    # A ClusterIP would pin each trainer's HTTP/2 connection, so all its calls, to one pod.
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    ports = container_ports(deployment)
    command = container(deployment)["command"]
    assert ports["grpc"] == int(option(command, "--port"))
    assert ports["metrics"] == int(option(command, "--metrics-port"))
    for port in service["spec"]["ports"]:
        # Headless: clients dial the pod's own port, so the two must be one number.
        assert ports[port["targetPort"]] == port["port"], port["name"]
    assert {p["name"] for p in service["spec"]["ports"]} == set(ports)


def _parses(words: list[str]):
    assert words[0] == "batchwire", words
    return build_parser().parse_args(words[1:])


def test_the_server_container(objects: dict[str, dict]) -> None:
    deployment, config_map = objects["Deployment"], objects["ConfigMap"]
    spec, server = pod_spec(deployment), container(deployment)
    args = _parses(server["command"])
    assert args.command == "serve" and args.host == "0.0.0.0"

    # Every probe is `batchwire health` against this container's gRPC port.
    grpc_port = container_ports(deployment)["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe_args = _parses(server[probe]["exec"]["command"])
        assert probe_args.command == "health", probe
        assert check_target(probe_args.target) == f"localhost:{grpc_port}", probe
        # The probe's own timeout leaves room for the command's (a Python start + its RPC).
        assert server[probe]["timeoutSeconds"] > probe_args.timeout, probe
    # Liveness outlasts a drain (readiness turns at once, so DNS drops the pod).
    config = tomllib.loads(config_map["data"]["batchwire.toml"])
    liveness = server["livenessProbe"]
    grace = config["server"]["grace_seconds"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace
    assert spec["terminationGracePeriodSeconds"] > grace

    # The config file is the ConfigMap's, mounted where --config points.
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_dir, config_file = os.path.split(args.config)
    assert mounts[config_dir]["readOnly"] is True
    assert (
        volumes[mounts[config_dir]["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    )
    assert config_file in config_map["data"]
    # Workers hand batches over in /dev/shm: a memory-backed emptyDir, not 64 MB.
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # The root filesystem is read-only; temporary files (the forkserver's socket) go to /tmp.
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]

    resources = server["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert config["server"]["workers"] <= float(resources["limits"]["cpu"])
    _check_security(spec, server)


def _check_security(spec: dict, one: dict) -> None:
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())[1])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid  # the image's own user
    assert spec["automountServiceAccountToken"] is False
    security = one["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_the_trainer_job_targets_every_replica(objects: dict[str, dict]) -> None:
    job, service = objects["Job"], objects["Service"]
    spec, trainer = pod_spec(job), container(job)
    env = {e["name"]: e["value"] for e in trainer["env"]}
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    target = f"dns:///{name}.{namespace}.svc.cluster.local:{grpc_port}"
    assert env["BATCHWIRE_TARGET"] == target and check_target(target) == target
    assert trainer["command"][0] == "python"
    assert (ROOT / trainer["command"][1]).is_file()
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    _check_security(spec, trainer)


def test_the_config_map_is_a_valid_config(objects: dict[str, dict], tmp_path: Path) -> None:
    files = write_config_map(objects["ConfigMap"], tmp_path)
    config = load_config(files / "batchwire.toml")
    assert set(config.datasets) >= {"digits", "digits-test"}


# -- running the manifests' commands ----------------------------------------------


def write_config_map(config_map: dict, folder: Path) -> Path:
    """The ConfigMap's files in ``folder``, the image's /app read as this checkout."""
    for name, text in config_map["data"].items():
        (folder / name).write_text(text.replace(f'"{IMAGE_WORKDIR}/', f'"{ROOT}/'))
    return folder


class Local:
    """One container's view mapped onto this machine.

    Its address (0.0.0.0, localhost) -> ``host`` (replica i is 127.0.0.i+1: all of
    127/8 is loopback), its fixed ports -> free ones (one map for all replicas, which
    share a port as pods do), mounted folders -> local ones, and a DNS target naming
    every replica -> the same name resolved by a DNS server on loopback.
    """

    def __init__(
        self,
        host: str,
        ports: dict[str, str],
        mounts: dict[str, Path],
        names: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.ports = ports
        self.mounts = mounts
        self.names = names or {}

    def arg(self, value: str) -> str:
        if value in self.names:
            return self.names[value]
        if value in self.ports:  # --port 50051
            return self.ports[value]
        value = value.replace("0.0.0.0", self.host).replace("localhost:", f"{self.host}:")
        value = re.sub(r"(?<=:)(\d+)\b", lambda port: self.ports.get(port[1], port[1]), value)
        for mounted, folder in self.mounts.items():
            if value.startswith(mounted + "/"):
                value = str(folder) + value[len(mounted) :]
        return value

    def command(self, words: list[str]) -> list[str]:
        head = {"batchwire": batchwire_command(), "python": [sys.executable]}.get(words[0])
        return [*(head or [words[0]]), *(self.arg(w) for w in words[1:])]

    def env(self, pairs: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **{k: self.arg(str(v)) for k, v in pairs.items()}}


def replica_hosts(count: int) -> list[str]:
    return [f"127.0.0.{i + 1}" for i in range(count)]


@contextmanager
def resolving(target: str, hosts: list[str], ports: dict[str, str]) -> Iterator[dict[str, str]]:
    """``{target: the same name, resolved by a DNS stub to every replica}``."""
    name, port = target.removeprefix("dns:///").rsplit(":", 1)
    stub = DnsStub(name, hosts)
    try:
        yield {target: stub.target(int(ports[port]))}
    finally:
        stub.close()


@contextmanager
def replicas_running(
    command: list[str], env: dict[str, str], probe: list[str], views: list[Local], logs: Path
) -> Iterator[list[subprocess.Popen]]:
    """One server process per view, each ready by its own probe; SIGTERM drains them."""
    with ExitStack() as stack:
        processes = []
        for i, view in enumerate(views):
            log = stack.enter_context((logs / f"replica{i}.log").open("w"))
            process = subprocess.Popen(
                view.command(command),
                env=view.env(env),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(_stop, process)
            processes.append(process)
        deadline = time.monotonic() + 180
        for process, view in zip(processes, views, strict=True):
            while subprocess.run(view.command(probe), capture_output=True, timeout=60).returncode:
                assert process.poll() is None, "a replica exited before it was ready"
                assert time.monotonic() < deadline, "a replica never became ready"
                time.sleep(0.5)
        yield processes
        for process in processes:  # SIGTERM drains and exits 0
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def run_trainer(view: Local, command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(
        view.command(command),
        env=view.env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test accuracy through batchwire" in result.stdout


def assert_every_replica_served(logs: Path, count: int) -> None:
    served = ["stream start" in (logs / f"replica{i}.log").read_text() for i in range(count)]
    assert all(served), f"replicas that served streams: {served}"


def test_the_deployment_and_the_trainer_job_run_as_local_processes(
    objects: dict[str, dict], tmp_path: Path
) -> None:
    deployment, job = objects["Deployment"], objects["Job"]
    server, trainer = container(deployment), container(job)
    config_dir = next(m["mountPath"] for m in server["volumeMounts"] if m["name"] == "config")
    mounts = {config_dir: write_config_map(objects["ConfigMap"], tmp_path)}
    ports = {str(p): str(free_port()) for p in container_ports(deployment).values()}
    hosts = replica_hosts(deployment["spec"]["replicas"])
    views = [Local(host, ports, mounts) for host in hosts]
    server_env = {e["name"]: e["value"] for e in server.get("env", [])}
    trainer_env = {e["name"]: e["value"] for e in trainer["env"]}
    probe = server["readinessProbe"]["exec"]["command"]
    with (
        replicas_running(server["command"], server_env, probe, views, tmp_path),
        resolving(trainer_env["BATCHWIRE_TARGET"], hosts, ports) as names,
    ):
        liveness = server["livenessProbe"]["exec"]["command"]
        for view in views:  # the same check, passing
            assert subprocess.run(view.command(liveness), capture_output=True).returncode == 0
        run_trainer(Local("127.0.0.1", ports, {}, names), trainer["command"], trainer_env)
    assert_every_replica_served(tmp_path, len(hosts))


# -- docker compose up --scale server=3 --------------------------------------------


def test_the_compose_server_scales() -> None:
    """Nothing in the `server` service is one per host: no host port, no container name."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    server = services["server"]
    assert "container_name" not in server
    for port in server.get("ports", []):
        assert ":" not in str(port), f"{port!r} pins a host port: a second replica cannot bind it"
    # The trainer and the load test reach every replica through compose's DNS.
    trainer_target = services["trainer"]["environment"]["BATCHWIRE_TARGET"]
    assert trainer_target == "dns:///server:50051"
    assert option(services["loadtest"]["command"], "--target") == trainer_target


def test_compose_itself_sees_nothing_against_scaling() -> None:
    """docker-compose's own check before scaling (``Service.show_scale_warnings``)."""
    if not Path("/usr/bin/docker-compose").exists():
        if os.environ.get("BATCHWIRE_REQUIRE_COMPOSE"):
            pytest.fail("docker-compose is not installed (.ci/run installs Debian's package)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    # Debian's docker-compose 1.29 is Python: its loader and Service, without an engine.
    script = f"""
from compose.config import config
from compose.config.environment import Environment
from compose.service import Service
found = config.find({str(ROOT)!r}, [{str(COMPOSE_FILE)!r}], Environment.from_env_file({str(ROOT)!r}))
options = {{s["name"]: s for s in config.load(found).services}}["server"]
service = Service("server", client=None, project="batchwire", **{{k: v for k, v in options.items() if k != "name"}})
print(service.specifies_host_port(), service.custom_container_name)
"""
    interpreter = Path("/usr/bin/docker-compose").read_text().splitlines()[0][2:].strip()
    result = subprocess.run(
        [*shlex.split(interpreter), "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "None"]


def test_compose_scaled_to_three_runs_as_local_processes(tmp_path: Path) -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    server, trainer = services["server"], services["trainer"]
    ports = {str(p): str(free_port()) for p in server["ports"]}
    hosts = replica_hosts(3)  # docker compose up --scale server=3
    views = [Local(host, ports, {}) for host in hosts]
    probe = server["healthcheck"]["test"][1:]
    environment = server.get("environment", {})
    with (
        replicas_running(server["command"], environment, probe, views, tmp_path),
        resolving(trainer["environment"]["BATCHWIRE_TARGET"], hosts, ports) as names,
    ):
        run_trainer(
            Local("127.0.0.1", ports, {}, names), trainer["command"], trainer["environment"]
        )
    assert_every_replica_served(tmp_path, len(hosts))


def test_the_image_extras_are_the_packages_extras() -> None:
    # `docker build --build-arg EXTRAS=...`: the default and the documented example name
    # extras that pyproject.toml defines (pip would only warn about an unknown one).
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = re.findall(r'ARG EXTRAS="([^"]+)"', dockerfile) + re.findall(
        r"--build-arg EXTRAS=(\S+)", dockerfile
    )
    assert len(named) == 2, named
    for spec in named:
        assert set(spec.split(",")) <= set(extras), (spec, sorted(extras))
    assert 'pip install ".[${EXTRAS}]"' in dockerfile
