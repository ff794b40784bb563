"""Issue 16 point 4: the compose profile `monitoring` (Prometheus + Grafana) and its dashboard.

Validated without a Docker engine: the services, the files they mount, the
scrape target against the server's metrics port, the provisioned data source
against the Prometheus service, and every metric the dashboard queries against
what a live server (and a trainer with metrics on) really exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from _serverproc import ServerProcess, free_port
from ops_support import scrape
from test_ops_compose import compose_config
from test_ops_health import write_config

from batchwire.client import RemoteDataset

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "batchwire.json"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def _mounts(service: dict) -> dict[str, Path]:
    """{container path: host path} of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        out[container] = (ROOT / host).resolve()
    return out


def test_monitoring_profile_declares_prometheus_and_grafana(services: dict) -> None:
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        assert service["profiles"] == ["monitoring"]
        for host_path in _mounts(service).values():
            assert host_path.exists(), host_path
    # Nothing in the default `docker compose up` changes.
    assert "profiles" not in services["server"] and "profiles" not in services["trainer"]
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_prometheus_scrapes_the_servers_metrics_port(services: dict) -> None:
    config_path = _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    server_command = services["server"]["command"]
    metrics_port = server_command[server_command.index("--metrics-port") + 1]
    targets = {
        job["job_name"]: t
        for job in config["scrape_configs"]
        for s in job.get("static_configs", [])
        for t in s["targets"]
    }
    # The servers by DNS: one target per replica of a scaled `server` service.
    (servers,) = next(
        job["dns_sd_configs"]
        for job in config["scrape_configs"]
        if job["job_name"] == "batchwire-server"
    )
    assert servers["names"] == ["server"] and servers["type"] == "A"
    assert servers["port"] == int(metrics_port)
    assert "batchwire-server" not in targets


def test_grafana_provisions_the_datasource_and_the_dashboard(services: dict) -> None:
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    container_port = services["prometheus"]["ports"][0].split(":")[1].strip('"')
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{container_port}"
    providers = yaml.safe_load((provisioning / "dashboards" / "batchwire.yml").read_text())
    (provider,) = providers["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert DASHBOARD.parent == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "batchwire"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def _queried_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {m for e in exprs for m in re.findall(r"\bbatchwire_\w+", e)}


def test_every_dashboard_metric_is_exported(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from batchwire.client import _stats, enable_metrics

    metrics_port = free_port()
    config = write_config(tmp_path)
    registry = CollectorRegistry()
    enable_metrics(registry)
    try:
        with ServerProcess(
            config, workers=1, extra=["--metrics-port", str(metrics_port)]
        ) as server:
            ds = RemoteDataset(server.target, "dict", batch_size=16)
            for _ in range(2):  # the second pass reports the first to the server
                assert sum(1 for _ in ds) == 4
            server_names = {name for name, _ in scrape(metrics_port)}
    finally:
        _stats._exported = None
    client_names = {s.name for family in registry.collect() for s in family.samples}
    exported = server_names | client_names
    # A family's samples: name, name_total, name_bucket, ...
    missing = sorted(m for m in _queried_metrics() if m not in exported)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"


def test_compose_config_with_the_monitoring_profile() -> None:
    services = compose_config("monitoring")["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
