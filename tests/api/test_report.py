"""`tally report`: the API's figures in a terminal, as a table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from domain.periods import add_months
from runtime.settings import Settings
from schemas.plans import Catalog
from tests.api import test_history
from tests.api.conftest import ApiServer

AT = datetime(2026, 11, 15, tzinfo=UTC)
# The seed catalog with Pro billed in euros, for the API's topics and the invoice job.
api_catalog = test_history.api_catalog


def report(settings: Settings, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tally.cli", "report", "--cycle", AT.isoformat(), *args],
        capture_output=True, text=True, timeout=90,
        env={**os.environ, **settings.to_env(), "TALLY_HOME": str(home)})


def test_report_shows_usage_against_limits_in_each_format(api_settings: Settings,
                                                          tmp_path: Path) -> None:
    assert api_settings.database_url is not None
    with psycopg.connect(api_settings.database_url) as conn:
        conn.execute(
            "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end,"
            " plan_id, quantity, event_count) VALUES"
            " ('acme', 'api_calls', '2026-11-01Z', '2026-12-01Z', 'free', 900, 9),"
            " ('globex', 'api_calls', '2026-11-01Z', '2026-12-01Z', 'free', 1000, 10)")
    table = report(api_settings, home=tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    acme = next(line for line in lines if line.startswith("acme") and "api_calls" in line)
    assert acme.split()[3:7] == ["900", "1000", "1000", "warning"]
    globex = next(line for line in lines if line.startswith("globex") and "api_calls" in line)
    assert "blocked" in globex
    assert "Pipeline lag" in table.stdout

    data = json.loads(report(api_settings, "--json", "--tenant", "acme", home=tmp_path).stdout)
    assert [t["tenant"] for t in data["tenants"]] == ["acme"]
    calls = next(m for m in data["tenants"][0]["meters"] if m["meter"] == "api_calls")
    assert (calls["used"], calls["state"], calls["remaining"]) == ("900", "warning", "100")

    rows = list(csv.DictReader(io.StringIO(
        report(api_settings, "--format", "csv", home=tmp_path).stdout)))
    assert {(r["tenant"], r["meter"], r["used"]) for r in rows} >= {
        ("acme", "api_calls", "900"), ("globex", "api_calls", "1000")}


def test_report_for_an_unknown_tenant_says_so(api_settings: Settings, tmp_path: Path) -> None:
    result = report(api_settings, "--tenant", "nobody", home=tmp_path)
    assert result.returncode == 2 and "unknown tenant 'nobody'" in result.stderr


def test_report_of_a_cycle_changing_currency_shows_each_currencys_charges(
        api: ApiServer, stripe_double_url: str, api_catalog: Catalog, tmp_path: Path) -> None:
    # Starter in dollars for a week, then Pro billed in euros: the report, as the API,
    # shows each currency's charges apart (docs/billing.md rule 10), each what that
    # currency's invoice for the cycle then carries.
    start = datetime(2026, 11, 1, tzinfo=UTC)
    end = add_months(start, 1)
    period = {"period_start": start.isoformat(), "period_end": end.isoformat()}
    test_history.record_history(
        api, "acme",
        [("created", {"plan_id": "starter", **period}, start),
         ("plan_changed", {"plan_id": "pro_eur", **period}, start + timedelta(days=7))],
        [("u1", "api_calls", 19_000, start + timedelta(days=3)),
         ("u2", "api_calls", 170_000, start + timedelta(days=10))])
    data = json.loads(report(api.settings, "--json", "--tenant", "acme",
                             home=tmp_path).stdout)
    [current] = data["tenants"]
    shown = {c["currency"]: c["charges_cents"]
             for c in [current, *current["other_currencies"]]}
    test_history.issue_invoices(api, stripe_double_url, end + timedelta(days=1), api_catalog)
    invoices = test_history.invoiced(api, "acme")
    assert shown == {currency: sum(amount for _, _, amount in invoices[(start, currency)])
                     for currency in ("eur", "usd")}
    assert all(shown.values())

    table = report(api.settings, "--tenant", "acme", home=tmp_path).stdout
    assert [line.split(": ")[1] for line in table.splitlines()
            if "usage charges so far" in line] == [
        f"{shown['eur'] / 100:.2f} eur", f"{shown['usd'] / 100:.2f} usd"]
    rows = list(csv.DictReader(io.StringIO(
        report(api.settings, "--format", "csv", "--tenant", "acme", home=tmp_path).stdout)))
    calls = {r["currency"]: int(r["amount_cents"]) for r in rows if r["meter"] == "api_calls"}
    assert calls.keys() == {"eur", "usd"} and all(calls.values())
