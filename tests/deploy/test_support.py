"""The deploy checks catch what they are for: a wrong command, variable or metric."""

from __future__ import annotations

import pytest

from tests.deploy.support import (
    EXTERNAL_METRICS,
    PENDING_METRICS,
    NotACommand,
    environment_names,
    exported_metrics,
    parse_tally,
    selected_metrics,
    unknown_metrics,
)


def test_a_command_tally_does_not_have_is_refused() -> None:
    parse_tally(["worker", "--web-port", "6066"])
    for argv in (["wrker"], ["worker", "--no-such-flag"], ["jobs"], ["notify", "serve"]):
        with pytest.raises(NotACommand):
            parse_tally(argv)


def test_settings_and_directly_read_variables_are_known_and_nothing_else() -> None:
    names = environment_names()
    assert {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "TALLY_PARTITIONS",
            "TALLY_KAFKA_IDEMPOTENCE", "STRIPE_WEBHOOK_SECRET", "TALLY_HOME"} <= names
    assert "TALLY_NO_SUCH_SETTING" not in names
    assert "KAFKA_SASL_MECHANISM" not in names


def test_metrics_are_read_from_the_registry_with_their_series_names() -> None:
    exported = exported_metrics()
    assert exported["tally_worker_events_total"] == {"outcome"}
    assert "tally_projection_write_seconds_bucket" in exported
    assert "tally_billing_reconcile_mismatches" in exported


def test_an_unknown_metric_or_label_is_reported() -> None:
    assert unknown_metrics('sum(rate(tally_worker_events_total{outcome="counted"}[5m]))') == []
    assert unknown_metrics("rate(tally_worker_eventz_total[5m])") == [
        "tally_worker_eventz_total: no such metric in the code"]
    assert unknown_metrics('tally_worker_events_total{meter="x"}') == [
        "tally_worker_events_total: no label meter"]
    # A metric's own `job` label is stored as `exported_job`; other metrics have none.
    assert unknown_metrics('tally_billing_job_runs_total{exported_job="invoice"}') == []
    assert unknown_metrics('tally_worker_events_total{exported_job="x"}') == [
        "tally_worker_events_total: no label exported_job"]
    names = [name for name, _ in selected_metrics(
        "a > on (topic) group_left b or absent(c{job='x'})"
        " unless sum by (l) (max_over_time(d[5m:1m]))")]
    assert names == ["a", "b", "c", "d"]


def test_pending_metrics_are_still_missing_and_external_ones_not_in_the_code() -> None:
    exported = exported_metrics()
    for name in PENDING_METRICS:
        assert name not in exported, f"{name} is exported now: remove it from PENDING_METRICS"
    for name in EXTERNAL_METRICS:
        assert name not in exported
