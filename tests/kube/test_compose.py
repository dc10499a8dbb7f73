"""deploy/compose: the compose file's structure (no Docker engine runs it here) and every sidecar command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from .commands import run_settings

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose"
# Written by another part of the project; checked when present.
ELSEWHERE = {"../grafana"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def sidecars(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if str(s.get("image", "")).startswith("sidecar:")}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> path in the repository, for the bind mounts of a service."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = source
    return out


def test_a_three_member_etcd_cluster(compose) -> None:
    members = {n: s for n, s in compose["services"].items() if n.startswith("etcd-")}
    assert sorted(members) == ["etcd-1", "etcd-2", "etcd-3"]
    for name, member in members.items():
        assert member["image"].startswith("quay.io/coreos/etcd:v3.5.")
        env, command = member["environment"], member["command"]
        peers = dict(p.split("=", 1) for p in env["ETCD_INITIAL_CLUSTER"].split(","))
        assert peers == {m: f"http://{m}:2380" for m in members}
        flags = dict(zip(command[1::2], command[2::2], strict=True))
        assert flags == {"--name": name, "--advertise-client-urls": f"http://{name}:2379",
                         "--initial-advertise-peer-urls": f"http://{name}:2380"}
        assert f"{name}:/etcd-data" in member["volumes"] and env["ETCD_DATA_DIR"] == "/etcd-data"
        assert name in compose["volumes"]


def test_every_sidecar_command_and_environment_is_one_sidecar_run_accepts(compose) -> None:
    found = sidecars(compose)
    assert len(found) == 3
    capabilities = set()
    for name, service in found.items():
        files = {target: str(COMPOSE / source) for target, source in mounts(service).items()}
        settings = run_settings(service["command"], service["environment"], files, f"compose service {name}")
        agent_service = service["network_mode"].removeprefix("service:")
        agent = compose["services"][agent_service]
        assert f"-listen=:{settings.agent.port}" in agent["command"], name
        assert settings.agent.name and settings.agent.health.url.startswith(f"http://127.0.0.1:{settings.agent.port}")
        capabilities.add(settings.agent.capabilities)
        hosts = {urlsplit(e).netloc for e in settings.etcd.endpoints}
        assert hosts == {f"{m}:2379" for m in compose["services"] if m.startswith("etcd-")}
        assert set(service["depends_on"]) == {m for m in compose["services"] if m.startswith("etcd-")}
    assert len(capabilities) == 3, "the demo agents should differ in capabilities"


def test_published_ports_are_the_listeners_and_unique(compose) -> None:
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))
    chat = sidecars(compose)["chat-sidecar"]
    settings = run_settings(chat["command"], chat["environment"],
                            {t: str(COMPOSE / s) for t, s in mounts(chat).items()}, "chat-sidecar")
    ports = compose["services"]["chat-agent"]["ports"]
    for listen in (settings.admin.listen, settings.proxy.listen, settings.dns.listen):
        host, port = listen.rsplit(":", 1)
        # Docker forwards to the container's address, so a published listener cannot be on loopback.
        assert host == "0.0.0.0" and any(p.startswith(f"127.0.0.1:{port}:{port}") for p in ports), listen


def test_references_between_services_resolve(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == \
                (COMPOSE.parents[1] / "Dockerfile").resolve(), name
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), name
        mode = service.get("network_mode", "")
        assert not mode.startswith("service:") or mode.removeprefix("service:") in services, name
        for source in mounts(service).values():
            if source in ELSEWHERE and not (COMPOSE / source).exists():
                continue
            assert (COMPOSE / source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_prometheus_scrapes_every_sidecar_admin_api(compose) -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    expected = set()
    for name, service in sidecars(compose).items():
        settings = run_settings(service["command"], service["environment"],
                                {t: str(COMPOSE / s) for t, s in mounts(service).items()}, name)
        expected.add(f"{service['network_mode'].removeprefix('service:')}:{settings.admin.listen.rsplit(':', 1)[1]}")
    assert targets == expected
    prometheus = compose["services"]["prometheus"]
    assert set(config["rule_files"]) <= set(mounts(prometheus))


def test_grafana_reads_prometheus_and_the_dashboard_directory(compose) -> None:
    target = {source: target for target, source in mounts(compose["services"]["grafana"]).items()}
    assert target["./grafana/datasources.yml"].startswith("/etc/grafana/provisioning/datasources/")
    assert target["./grafana/dashboards.yml"].startswith("/etc/grafana/provisioning/dashboards/")
    datasources = yaml.safe_load((COMPOSE / "grafana" / "datasources.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert "--web.listen-address=:9090" in compose["services"]["prometheus"]["command"]
    providers = yaml.safe_load((COMPOSE / "grafana" / "dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == target["../grafana"]


def test_promtool_accepts_the_prometheus_config(tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    config["rule_files"] = [str(COMPOSE.parent / "prometheus" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
