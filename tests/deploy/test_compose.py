"""deploy/docker-compose.yml: it parses, runs real `tally` commands with real settings, and
its health checks and Prometheus scrape the ports those commands listen on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.support import (
    DEPLOY,
    check_python_c,
    environment_names,
    listening_port,
    load_yaml,
    parse_tally,
)

COMPOSE = DEPLOY / "docker-compose.yml"
STAGES = {
    "ingest": ["ingest", "serve"],
    "worker": ["worker"],
    "projector": ["project"],
    "notifier": ["notify", "serve"],
    "scheduler": ["jobs", "schedule"],
    "stripe-webhooks": ["stripe", "webhooks", "serve"],
}


def interpolate(value: str) -> str:
    """Compose's variable substitution with nothing set: ${X:-default} is the default."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def services() -> dict[str, Any]:
    result: dict[str, Any] = load_yaml(COMPOSE)["services"]
    return result


def tally_services() -> dict[str, Any]:
    """The services that run the Tally image (entrypoint `tally`)."""
    return {name: s for name, s in services().items() if s.get("image") == "tally:local"}


def command(service: dict[str, Any]) -> list[str]:
    return [interpolate(str(part)) for part in service.get("command", [])]


def test_compose_file_parses_with_every_stage_and_its_infrastructure() -> None:
    all_services = services()
    for name, argv in STAGES.items():
        assert command(all_services[name])[: len(argv)] == argv, name
    images = {name: s.get("image", "") for name, s in all_services.items()}
    assert images["kafka"].startswith("apache/kafka:")
    assert images["postgres"].startswith("postgres:")
    for infra in ("prometheus", "grafana", "alertmanager", "kafka-exporter", "demo-traffic",
                  "topics", "migrate", "plans"):
        assert infra in all_services, infra


def test_kafka_runs_in_kraft_mode() -> None:
    env = services()["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert not any(key.startswith("KAFKA_ZOOKEEPER") for key in env)


@pytest.mark.parametrize("name", sorted(tally_services()))
def test_every_tally_service_runs_a_real_command(name: str) -> None:
    service = tally_services()[name]
    if "entrypoint" in service:
        entrypoint = service["entrypoint"]
        assert entrypoint[:2] == ["python", "-c"], f"{name}: entrypoint {entrypoint}"
        check_python_c(entrypoint[2])
    else:
        parse_tally(command(service))


@pytest.mark.parametrize("name", sorted(tally_services()))
def test_every_variable_of_a_tally_service_is_a_setting(name: str) -> None:
    unknown = set(tally_services()[name].get("environment", {})) - environment_names()
    assert not unknown, f"{name} sets variables no Tally code reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_health_check_asks_the_port_the_command_listens_on(name: str) -> None:
    service = services()[name]
    port = listening_port(parse_tally(command(service)))
    probe = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/" in probe, f"{name} listens on {port}; health check: {probe}"


def test_prometheus_scrapes_every_stage_where_it_listens() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    scraped: dict[str, tuple[str, int]] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                scraped[job["job_name"]] = (host, sd["port"])
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.partition(":")
                scraped[job["job_name"]] = (host, int(port))
    all_services = services()
    for job_name, (host, _) in scraped.items():
        assert host in all_services, f"{job_name} scrapes {host}, not a compose service"
    stages = {host: port for host, port in scraped.values() if host in STAGES}
    assert set(stages) == set(STAGES), "every stage is scraped"
    for host, port in stages.items():
        assert listening_port(parse_tally(command(all_services[host]))) == port, host
    assert config["rule_files"] == ["alerts.yml"]
    assert "kafka-exporter" in {job["job_name"] for job in config["scrape_configs"]}


def test_the_topic_init_runs_before_the_pipeline() -> None:
    for name in STAGES:
        depends = tally_services()[name]["depends_on"]
        assert depends["topics"]["condition"] == "service_completed_successfully", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name


def test_files_the_services_mount_exist() -> None:
    compose = load_yaml(COMPOSE)
    paths: list[str] = [s["file"] for s in compose.get("secrets", {}).values()]
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                paths.append(source)
    for path in paths:
        assert (DEPLOY / path).exists(), f"{path} (relative to deploy/) does not exist"
    build = compose["services"]["worker"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).exists()


def test_grafana_mounts_its_dashboards_where_provisioning_looks() -> None:
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "tally.yml")
    wanted = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2][::-1] for v in services()["grafana"]["volumes"])
    assert Path(mounts[wanted]) == Path("./grafana/dashboards")


def test_grafana_has_every_variable_its_data_sources_expand() -> None:
    config = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "tally.yml")
    wanted = set(re.findall(r"\$\{(\w+)\}", json.dumps(config)))
    assert wanted <= set(services()["grafana"]["environment"])
