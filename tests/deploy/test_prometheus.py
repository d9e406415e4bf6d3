"""deploy/prometheus and deploy/alertmanager.yml: promtool and amtool accept them, every
alert fires in alerts.test.yml, names only metrics the code exports, and has a runbook."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from tests.deploy.support import (
    DEPLOY,
    OPERATIONS,
    alert_rules,
    load_yaml,
    markdown_anchors,
    tool,
    unknown_metrics,
)

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = [rule["alert"] for rule in alert_rules()]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)


def test_promtool_checks_the_rules_and_the_scrape_config() -> None:
    promtool = tool("promtool")
    for argv in ([promtool, "check", "rules", "alerts.yml"],
                 [promtool, "check", "config", "prometheus.yml"]):
        result = run(*argv)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run(tool("promtool"), "test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_fire_every_alert() -> None:
    tests = load_yaml(PROMETHEUS / "alerts.test.yml")["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    assert set(ALERTS) <= fired, f"never fired in alerts.test.yml: {set(ALERTS) - fired}"


@pytest.mark.parametrize("rule", alert_rules(), ids=ALERTS)
def test_every_alert_names_only_metrics_the_code_exports(rule: dict[str, Any]) -> None:
    assert unknown_metrics(rule["expr"]) == []


@pytest.mark.parametrize("rule", alert_rules(), ids=ALERTS)
def test_every_alert_has_a_severity_and_a_runbook_section(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"warning", "critical"}
    path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
    assert path == "docs/operations.md"
    assert anchor == rule["alert"].lower()
    assert anchor in markdown_anchors(OPERATIONS), f"docs/operations.md lacks ## {rule['alert']}"


def test_the_stage_alerts_name_the_scrape_jobs_prometheus_has() -> None:
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    for rule in alert_rules():
        for job in re.findall(r'\bjob="([^"]+)"', rule["expr"]):
            assert job in jobs, f"{rule['alert']} selects job {job}, which nothing scrapes"


def test_alertmanager_config_is_valid() -> None:
    result = subprocess.run([tool("amtool"), "check-config", str(DEPLOY / "alertmanager.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("labels,receivers", [
    (["alertname=TallyStageDown", "severity=critical"], "ops-page"),
    (["alertname=TallyConsumerLag", "severity=warning"], "ops-email"),
    (["alertname=TallyReconcileMismatch", "severity=critical"], "billing-email,ops-page"),
    (["alertname=TallyStripePushFailures", "severity=warning"], "billing-email,ops-email"),
])
def test_alertmanager_routes_alerts_to_mail_and_chat(labels: list[str], receivers: str) -> None:
    result = subprocess.run(
        [tool("amtool"), "config", "routes", "test", "--config.file",
         str(DEPLOY / "alertmanager.yml"), *labels],
        capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == receivers, result.stdout + result.stderr
    config = load_yaml(DEPLOY / "alertmanager.yml")
    kinds = {r["name"]: set(r) - {"name"} for r in config["receivers"]}
    assert kinds["ops-page"] == {"email_configs", "slack_configs"}
