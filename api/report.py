"""`tally report`: per tenant, usage against limits and quota states in a cycle, the
recent invoices, and the pipeline's lag: the API's figures (`api.charges`,
`api.queries`) in a terminal, as a table, JSON or CSV.

Lag is per projection and partition: the topic's end offset less the projection's next
offset, clamped at 0 (the embedded broker under-reports end offsets, DESIGN.md).
"""

from __future__ import annotations

import asyncio
import csv
import io
import sys
from datetime import UTC, datetime
from typing import Any

from aiokafka import TopicPartition

from api import charges, models, queries
from runtime import kafka, read_models
from runtime.plans import read_catalog
from runtime.postgres import connect_async
from runtime.read_models import fetch_async
from runtime.settings import Settings, SettingsError
from schemas.codec import dumps

RECENT_INVOICES = 5


async def gather(settings: Settings, tenant: str | None, at: datetime) -> dict[str, Any]:
    """The report's figures, as JSON-ready data."""
    conn = await connect_async(settings.require_database(), autocommit=True)
    async with conn:
        catalog = await read_catalog(settings)
        if catalog is None:
            raise SettingsError("no plan catalog on the plans topic: run `tally plans "
                                "publish`")
        if tenant is not None:
            if not await queries.tenant_known(conn, tenant):
                raise SettingsError(f"unknown tenant {tenant!r}: no usage or subscription "
                                    "of it")
            tenants = [tenant]
        else:
            found = await queries.tenants_usage(conn, at, None, "tenant", False, 10_000, 0)
            tenants = [t.tenant_id for t in found]
        cycles = [await charges.current_cycle(conn, catalog, t, at) for t in tenants]
        invoices = await fetch_async(conn, read_models.invoices(
            tenants if tenant else None, order="newest_period",
            limit=RECENT_INVOICES * (1 if tenant else 4)))
        offsets = await queries.projection_offsets(conn)
    return {
        "at": at.isoformat(),
        "tenants": [c.model_dump(mode="json") for c in cycles],
        "invoices": [{"invoice_id": i.invoice_id, "tenant": i.tenant_id,
                      "period_start": i.period_start.isoformat(), "status": i.status,
                      "total_cents": i.total_cents, "currency": i.currency}
                     for i in invoices],
        "lag": await _lag(settings, offsets),
    }


async def _lag(settings: Settings, offsets: list[queries.Lag]) -> list[dict[str, Any]]:
    if not offsets:
        return []
    consumer = kafka.consumer(settings)
    await kafka.start(consumer)
    try:
        tps = [TopicPartition(o.topic, o.partition) for o in offsets]
        ends = await consumer.end_offsets(tps)
    finally:
        await kafka.stop(consumer)
    return [{"projection": o.projection, "topic": o.topic, "partition": o.partition,
             "lag": max(0, ends.get(TopicPartition(o.topic, o.partition), 0) - o.next_offset)}
            for o in offsets]


def _num(value: Any) -> str:
    return "-" if value is None else str(value)


def _by_currency(cycle: dict[str, Any]) -> list[dict[str, Any]]:
    """A tenant's current cycle as one entry per currency, the one in force first: its
    amounts are never added across currencies (`models.CurrentUsage`)."""
    return [cycle, *cycle["other_currencies"]]


def table(report: dict[str, Any]) -> str:
    out = [f"Tally report at {report['at']}", ""]
    out.append(f"{'tenant':<20} {'plan':<11} {'meter':<12} {'used':>12} {'included':>10} "
               f"{'limit':>10} {'state':<9} {'charge':>9}")
    for cycle in report["tenants"]:
        for c in map(models.UsageCycle.model_validate, _by_currency(cycle)):
            for m in c.meters:
                charge = "-" if m.amount_cents is None else f"{m.amount_cents / 100:.2f}"
                out.append(f"{c.tenant[:20]:<20} {c.plan_id[:11]:<11} {m.meter[:12]:<12} "
                           f"{_num(m.used):>12} {_num(m.included):>10} "
                           f"{_num(m.hard_limit):>10} {m.state:<9} {charge:>9}")
            total = ("-" if c.charges_cents is None
                     else f"{c.charges_cents / 100:.2f} {c.currency}")
            out.append(f"{'':<20} cycle {c.period_start:%Y-%m-%d}..{c.period_end:%Y-%m-%d}, "
                       f"usage charges so far: {total}")
    out += ["", "Recent invoices"]
    out += [f"  {i['invoice_id']}  {i['status']:<10} {i['total_cents'] / 100:>10.2f} "
            f"{i['currency']}" for i in report["invoices"]] or ["  (none)"]
    out += ["", "Pipeline lag (records not yet projected)"]
    out += [f"  {x['projection']:<12} {x['topic']:<32} p{x['partition']:<3} {x['lag']:>8}"
            for x in report["lag"]] or ["  (nothing projected yet)"]
    return "\n".join(out)


def rows_csv(report: dict[str, Any]) -> str:
    """One row per tenant, currency and meter: `amount_cents` is in the row's `currency`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["tenant", "plan_id", "period_start", "period_end", "meter", "used",
                     "included", "hard_limit", "remaining", "state", "amount_cents",
                     "currency"])
    for cycle in report["tenants"]:
        for c in _by_currency(cycle):
            for m in c["meters"]:
                writer.writerow([c["tenant"], c["plan_id"], c["period_start"],
                                 c["period_end"], m["meter"], m["used"], m["included"],
                                 m["hard_limit"], m["remaining"], m["state"],
                                 m["amount_cents"], c["currency"]])
    return buffer.getvalue()


def run_report(settings: Settings, tenant: str | None, cycle: datetime | None,
               fmt: str) -> int:
    report = asyncio.run(gather(settings, tenant, cycle or datetime.now(UTC)))
    if fmt == "json":
        sys.stdout.write(dumps(report).decode() + "\n")
    elif fmt == "csv":
        sys.stdout.write(rows_csv(report))
    else:
        print(table(report))
    return 0
