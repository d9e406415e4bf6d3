"""The meter query gives the exact values of the ledger: random ledgers and random windows,
time zones, filters and groupings, compared with a brute-force fold in Python by the
meter's aggregation kind (domain.aggregation), late events included."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.aggregation import Counter
from projections.ledger import create_month_partitions
from tests.api.conftest import ApiServer

START = datetime(2026, 9, 20, tzinfo=UTC)  # spans a DST change in Europe and America
SPAN = timedelta(days=80)
TENANTS = ("acme", "globex")
METERS = {"api_calls": "sum", "storage_mb": "max"}  # the seed catalog's kinds
REGIONS = ("eu", "us", "ap")
TIERS = ("a", "b")
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata")


def _rows(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        time = START + timedelta(seconds=rng.randrange(int(SPAN.total_seconds())),
                                 microseconds=i)  # no two rows share a time: no ties
        dims = {}
        if rng.random() < 0.9:
            dims["region"] = rng.choice(REGIONS)
        if rng.random() < 0.7:
            dims["tier"] = rng.choice(TIERS)
        rows.append({"event_id": f"e{i}", "tenant_id": rng.choice(TENANTS),
                     "meter": rng.choice(list(METERS)),
                     "quantity": Decimal(rng.randrange(0, 5000)) / 10, "event_time": time,
                     "dimensions": dims, "late": rng.random() < 0.1})
    return rows


@pytest.fixture
def ledger(api: ApiServer) -> tuple[ApiServer, list[dict[str, Any]]]:
    """A random ledger, written as the projector writes it."""
    rows = _rows(7, 600)
    assert api.settings.database_url is not None
    months = {datetime(2026, m, 1, tzinfo=UTC) for m in (9, 10, 11, 12)}
    with psycopg.connect(api.settings.database_url) as conn:
        create_month_partitions(conn, months)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity,"
                " event_time, ingested_at, source, dimensions, period_start, period_end,"
                " plan_id, late, aggregation) VALUES (%s,%s,%s,%s,%s,%s,'t',%s,%s,%s,"
                " 'free',%s,%s)",
                [(r["event_id"], r["tenant_id"], r["meter"], r["quantity"], r["event_time"],
                  r["event_time"] + (timedelta(hours=5) if r["late"] else timedelta()),
                  psycopg.types.json.Jsonb(r["dimensions"]), START, START + SPAN,
                  r["late"], METERS[r["meter"]]) for r in rows])
    return api, rows


def _bucket(moment: datetime, window: str | None, tz: str) -> datetime | None:
    """The window's start in local time, as `date_trunc` on local time gives it."""
    if window is None:
        return None
    local = moment.astimezone(ZoneInfo(tz)).replace(tzinfo=None)
    if window == "minute":
        return local.replace(second=0, microsecond=0)
    if window == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    if window == "day":
        return local.replace(hour=0, minute=0, second=0, microsecond=0)
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def reference(rows: list[dict[str, Any]], q: dict[str, Any]) -> dict[tuple[Any, ...], Decimal]:
    """The query folded by hand."""
    counters: dict[tuple[Any, ...], Counter] = {}
    wanted: dict[str, list[str]] = defaultdict(list)
    for item in q["filter"]:
        key, _, value = item.partition("=")
        wanted[key].append(value)
    for r in sorted(rows, key=lambda r: r["event_time"]):
        if (r["tenant_id"] != q["tenant"] or r["meter"] != q["meter"]
                or not q["from"] <= r["event_time"] < q["to"]):
            continue
        if any(r["dimensions"].get(k) not in v for k, v in wanted.items()):
            continue
        key = (_bucket(r["event_time"], q["window"], q["tz"]),
               *(r["dimensions"].get(k) for k in q["group_by"]))
        counter = counters.get(key)
        if counter is None:
            counter = counters[key] = Counter(tenant_id="", meter=q["meter"],
                                              period_start=START, period_end=START,
                                              aggregation=METERS[q["meter"]])
        counter.fold(r["quantity"], None, r["event_time"])
    return {k: c.value for k, c in counters.items()}


queries = st.fixed_dictionaries({
    "tenant": st.sampled_from(TENANTS),
    "meter": st.sampled_from(list(METERS)),
    "from": st.integers(0, 80 * 24).map(lambda h: START + timedelta(hours=h)),
    "length": st.integers(1, 80 * 24).map(lambda h: timedelta(hours=h)),
    "window": st.sampled_from([None, "hour", "day", "month"]),
    "tz": st.sampled_from(ZONES),
    "group_by": st.lists(st.sampled_from(["region", "tier", "absent"]), unique=True,
                         max_size=2),
    "filter": st.lists(st.sampled_from([f"region={r}" for r in REGIONS]
                                       + [f"tier={t}" for t in TIERS]), max_size=2),
})


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q=queries)
def test_query_results_equal_the_ledger_folded_by_hand(
        ledger: tuple[ApiServer, list[dict[str, Any]]], q: dict[str, Any]) -> None:
    api, rows = ledger
    q["to"] = q["from"] + q.pop("length")
    params: list[tuple[str, str]] = [
        ("tenant", q["tenant"]), ("from", q["from"].isoformat()), ("to", q["to"].isoformat()),
        ("tz", q["tz"]), *(("group_by", g) for g in q["group_by"]),
        *(("filter", f) for f in q["filter"])]
    if q["window"]:
        params.append(("window", q["window"]))
    answer = httpx.get(f"{api.url}/v1/meters/{q['meter']}/query", params=params,
                       headers=api.headers(), timeout=10)
    assert answer.status_code == 200, answer.text
    got = {}
    for row in answer.json()["data"]:
        start = datetime.fromisoformat(row["window_start"])
        key = (_bucket(start, q["window"], q["tz"]) if q["window"] else None,
               *(row["group"][k] for k in q["group_by"]))
        got[key] = Decimal(row["value"])
    assert got == reference(rows, q)


def test_a_bad_query_lists_every_problem(api: ApiServer) -> None:
    answer = httpx.get(f"{api.url}/v1/meters/api_calls/query", headers=api.headers(), params=[
        ("tenant", "acme"), ("tz", "Mars/Olympus"), ("from", "2026-12-01T00:00:00Z"),
        ("to", "2026-11-01T00:00:00Z"), ("filter", "no-equals-sign")])
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "tz" in error and "from must be before to" in error and "key=value" in error
