"""deploy/k8s: valid against the Kubernetes schemas, real commands and settings, probes and
requests on every workload, secrets only referenced, the topology docs/operations.md
describes (one scheduler, a PDB for the workers, a topic-init Job)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.deploy.support import (
    DEPLOY,
    check_python_c,
    environment_names,
    listening_port,
    load_yaml_documents,
    parse_tally,
)

K8S = DEPLOY / "k8s"
FILES = sorted(K8S.glob("*.yaml"))
WORKLOADS = ("Deployment", "StatefulSet")
SECRET_LIKE = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|DATABASE_URL|WEBHOOK_URL")
# Oldest and newest Kubernetes minor versions the manifests are checked against.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    return [doc for path in FILES for doc in load_yaml_documents(path)]


def of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [doc for doc in documents() if doc["kind"] in kinds]


def named(kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in of_kind(kind) if doc["metadata"]["name"] == name)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def tally_containers() -> list[tuple[str, dict[str, Any]]]:
    """(workload name, container) of every container that runs the Tally image."""
    return [(doc["metadata"]["name"], c) for doc in of_kind(*WORKLOADS, "Job")
            for c in pod_spec(doc)["containers"] if c["image"].startswith("tally:")]


def config_map_keys(name: str) -> set[str]:
    return set(named("ConfigMap", name)["data"])


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(path: Path, version: str) -> None:
    for doc in load_yaml_documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_secrets_are_referenced_never_written_in_the_manifests() -> None:
    assert not of_kind("Secret")
    for workload, container in tally_containers():
        for env in container.get("env", []):
            if SECRET_LIKE.search(env["name"]):
                assert "secretKeyRef" in env.get("valueFrom", {}), (
                    f"{workload}: {env['name']} must come from a Secret")
    for key in config_map_keys("tally-config"):
        assert not SECRET_LIKE.search(key), f"{key} belongs in a Secret"


@pytest.mark.parametrize("workload,container", tally_containers(),
                         ids=[w for w, _ in tally_containers()])
def test_every_tally_container_runs_a_real_command_with_real_settings(
        workload: str, container: dict[str, Any]) -> None:
    env_names = {env["name"] for env in container.get("env", [])}
    # $(NAME) in args is Kubernetes' own expansion from the container's env.
    expanded = {name for arg in container.get("args", [])
                for name in re.findall(r"\$\((\w+)\)", arg)}
    assert expanded <= env_names, f"{workload}: args use undefined {expanded - env_names}"
    for source in container.get("envFrom", []):
        env_names |= config_map_keys(source["configMapRef"]["name"])
    unknown = env_names - expanded - environment_names()
    assert not unknown, f"{workload} sets variables no Tally code reads: {sorted(unknown)}"
    if "command" in container:
        assert container["command"][:2] == ["python", "-c"], container["command"]
        check_python_c(container["command"][2])
    else:
        parse_tally([re.sub(r"\$\(\w+\)", "x", arg) for arg in container["args"]])


def test_every_workload_has_probes_and_resource_requests() -> None:
    for doc in of_kind(*WORKLOADS):
        for container in pod_spec(doc)["containers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, where
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), where
            assert "memory" in container["resources"].get("limits", {}), where


def _probe_port(probe: dict[str, Any], container: dict[str, Any]) -> int:
    if "exec" in probe:
        match = re.search(r"127\.0\.0\.1:(\d+)/", " ".join(probe["exec"]["command"]))
        assert match, probe
        return int(match.group(1))
    port = (probe.get("httpGet") or probe["tcpSocket"])["port"]
    if isinstance(port, int):
        return port
    named_port: int = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    return named_port


def test_probes_and_scrape_annotations_use_the_port_the_command_listens_on() -> None:
    for doc in of_kind(*WORKLOADS):
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        for container in pod_spec(doc)["containers"]:
            if not container["image"].startswith("tally:"):
                continue
            name = doc["metadata"]["name"]
            port = listening_port(parse_tally(container["args"]))
            assert port is not None, name
            for probe in ("readinessProbe", "livenessProbe"):
                assert _probe_port(container[probe], container) == port, f"{name} {probe}"
            assert annotations.get("prometheus.io/port") == str(port), name
            assert port in {p["containerPort"] for p in container["ports"]}, name


def test_every_long_running_stage_has_a_service_that_selects_it() -> None:
    services = of_kind("Service")
    for doc in of_kind(*WORKLOADS):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert any(s["spec"]["selector"].items() <= labels.items() for s in services), (
            f"no Service selects {doc['metadata']['name']}")


def test_topology() -> None:
    stages = {doc["metadata"]["name"]: doc for doc in of_kind(*WORKLOADS)}
    assert {"tally-gateway", "tally-worker", "tally-projector", "tally-notifier",
            "tally-scheduler", "tally-webhooks"} <= set(stages)
    assert stages["tally-scheduler"]["spec"]["replicas"] == 1
    assert stages["tally-scheduler"]["spec"]["strategy"]["type"] == "Recreate"
    assert stages["tally-projector"]["spec"]["replicas"] == 1
    partitions = int(named("ConfigMap", "tally-config")["data"]["TALLY_PARTITIONS"])
    assert stages["tally-worker"]["spec"]["replicas"] <= partitions
    worker_labels = stages["tally-worker"]["spec"]["template"]["metadata"]["labels"]
    assert any(pdb["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
               for pdb in of_kind("PodDisruptionBudget"))
    jobs = {doc["metadata"]["name"]: pod_spec(doc)["containers"][0] for doc in of_kind("Job")}
    assert "ensure_topics" in " ".join(jobs["tally-topics"]["command"])
    assert jobs["tally-migrate"]["args"] == ["db", "migrate"]
