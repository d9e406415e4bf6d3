"""deploy/grafana: the committed dashboards are what generate.py makes, their Prometheus
queries name only exported metrics, and every SQL panel runs as Grafana's login in the
read-only finance role on a migrated database."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools import devstack
from runtime.postgres import migrate
from tests.deploy.support import DEPLOY, grafana_to_promql, load_yaml, unknown_metrics

GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
# Grafana's SQL macros, as they expand over a 30-day range.
MACROS = {
    r"\$__timeFilter\((\w+)\)": r"\1 BETWEEN now() - interval '30 days' AND now()",
    r"\$__timeFrom\(\)": "(now() - interval '30 days')",
    r"\$__timeTo\(\)": "now()",
}


def targets() -> Iterator[tuple[str, dict[str, Any]]]:
    """(dashboard/panel title, target) of every query of every dashboard."""
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                yield f"{path.stem}/{panel['title']}/{target['refId']}", target


PROM = [(where, t) for where, t in targets() if "expr" in t]
SQL = [(where, t) for where, t in targets() if "rawSql" in t]


def test_the_committed_dashboards_are_what_the_generator_makes() -> None:
    result = subprocess.run([sys.executable, str(GRAFANA / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {p.stem for p in DASHBOARDS} == {"pipeline", "usage", "billing", "revenue"}


def test_every_query_uses_a_provisioned_data_source() -> None:
    provisioned = {ds["uid"]: ds["type"] for ds in
                   load_yaml(GRAFANA / "provisioning" / "datasources" / "tally.yml")["datasources"]}
    for where, target in targets():
        ref = target["datasource"]
        assert provisioned.get(ref["uid"]) == ref["type"], where
    assert PROM and SQL


@pytest.mark.parametrize("where,target", PROM, ids=[w for w, _ in PROM])
def test_every_panel_names_only_metrics_the_code_exports(
        where: str, target: dict[str, Any]) -> None:
    assert unknown_metrics(grafana_to_promql(target["expr"])) == []


def expand(sql: str) -> str:
    for macro, replacement in MACROS.items():
        sql = re.sub(macro, replacement, sql)
    assert "$" not in sql, f"a Grafana macro the test does not expand: {sql}"
    return sql


# A little of everything the panels read, so each query runs over rows.
SEED = """
INSERT INTO tally.plans VALUES
  ('starter', 'Starter', 'usd', 2900, 29000, 1, '{}'), ('pro', 'Pro', 'usd', 9900, NULL, 2, '{}');
INSERT INTO tally.plan_meters VALUES ('starter', 'api_calls', 10000, 20000, NULL);
INSERT INTO tally.subscriptions VALUES
  ('t1', 'pro', 'active', date_trunc('month', now()),
   date_trunc('month', now()) + interval '1 month', NULL, NULL, now()),
  ('t2', 'starter', 'active', now() - interval '1 day', now() + interval '364 days', NULL, NULL,
   now()),
  ('t3', 'starter', 'canceled', now() - interval '9 days', now() + interval '21 days', NULL, NULL,
   now() - interval '2 days');
INSERT INTO tally.subscription_segments (tenant_id, subscription_id, plan_id, billing_interval,
  currency, status, valid_from, valid_to, trial_end)
  VALUES ('t4', 't4/trial', 'pro', 'month', 'usd', 'trialing', now() - interval '11 days',
  now() + interval '3 days', now() + interval '3 days');
INSERT INTO tally.usage_daily (tenant_id, meter, day, quantity, event_count)
  VALUES ('t1', 'api_calls', current_date, 120, 120);
INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end, plan_id, quantity,
  event_count) VALUES ('t1', 'api_calls', now() - interval '1 day', now() + interval '1 day', 'pro',
  120, 120);
INSERT INTO tally.quota_state VALUES
  ('t2', 'api_calls', now() - interval '1 day', 19000, 20000, 'exceeded', now());
INSERT INTO tally.invoices (invoice_id, tenant_id, period_start, period_end, currency,
  subtotal_cents, total_cents, status, plan_id)
  VALUES ('i1', 't1', now() - interval '25 days', now() + interval '5 days', 'usd', 2900, 2900,
  'open', 'starter');
"""


@pytest.fixture(scope="module")
def grafana_database_url() -> Iterator[str]:
    """A migrated database with a few rows, and the URL Grafana's login uses on it: the
    roles exactly as deploy/postgres/initdb creates them for the compose stack."""
    home = Path(tempfile.mkdtemp(prefix="tally-deploy-"))
    try:
        env = {k: v for k, v in os.environ.items() if k == "DATABASE_URL"}
        with devstack.embedded_where_missing(home, env, kafka=False) as stack:
            admin_url = stack["DATABASE_URL"]
            name = f"t_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
                init = (DEPLOY / "postgres" / "initdb" / "10-tally-grafana.sql").read_text()
                for statement in filter(str.strip, re.sub(r"--.*", "", init).split(";")):
                    # A shared server (DATABASE_URL) may have the roles already.
                    with contextlib.suppress(psycopg.errors.DuplicateObject):
                        conn.execute(statement)
            base, _, query = admin_url.partition("?")
            url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
            migrate(url)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(SEED)
            conninfo = psycopg.conninfo.conninfo_to_dict(url)
            conninfo.update(user="tally_grafana", password="tally_grafana")
            yield psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in conninfo.items()})
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("where,target", SQL, ids=[w for w, _ in SQL])
def test_every_sql_panel_runs_as_the_read_only_finance_role(
        where: str, target: dict[str, Any], grafana_database_url: str) -> None:
    with psycopg.connect(grafana_database_url) as conn:
        conn.read_only = True
        user = conn.execute("SELECT current_user").fetchone()
        assert user == ("tally_grafana",)
        cursor = conn.execute(expand(target["rawSql"]).encode())
        rows = cursor.fetchall()
        columns = [c.name for c in cursor.description or []]
        if target["format"] == "time_series":
            assert "time" in columns, f"{where}: a time series needs a `time` column"
        assert rows, f"{where}: no rows over the seeded data"


def test_the_finance_role_cannot_read_the_stripe_journal(grafana_database_url: str) -> None:
    with psycopg.connect(grafana_database_url) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT count(*) FROM tally.stripe_pushes")
