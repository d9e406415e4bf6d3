"""The projector's handlers of current state: subscriptions (the current view and the
history), quota states and the plan catalog. Each runs inside the batch's transaction and is
safe to re-apply to a suffix of the log in order (last write wins by key)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from projections.batch import REJECTED, Batch, Record, Records, record_time
from projections.history import history_row, write_history
from runtime.plans import METERS_KEY
from runtime.postgres import Connection
from schemas.codec import RecordDecodeError, decode_record, loads
from schemas.events import SubscriptionEvent
from schemas.plans import MeterSpec, Plan, format_validation_error
from schemas.records import QuotaState

_SUBSCRIPTION = TypeAdapter(SubscriptionEvent)
_METERS = TypeAdapter(dict[str, MeterSpec])
_STATUS = {
    "tally.subscription.created.v1": "active",
    "tally.subscription.plan_changed.v1": "active",
    "tally.subscription.renewed.v1": "active",
    "tally.subscription.canceled.v1": "canceled",
}


def write_rows(conn: Connection, batch: Batch, sql: str,
               rows: list[tuple[Record, int, Any, tuple[Any, ...]]]) -> None:
    """`sql` for every row (record, item, raw, parameters); if the database refuses
    the lot, each row under its own savepoint, and the rows it refuses are reported
    (a value Postgres cannot hold must not stop the projector)."""
    if not rows:
        return
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(sql, [params for *_, params in rows])
        return
    except REJECTED:
        pass
    for r, item, raw, params in rows:
        try:
            with conn.transaction():
                conn.execute(sql, params)
        except REJECTED as e:
            batch.report(r, item, "rejected_by_database", str(e).splitlines()[0], raw)

def project_subscriptions(conn: Connection, batch: Batch, records: Records, schema: str) -> None:
    """`tally.subscriptions` (the current view) and the subscription history."""
    rows, history = [], []
    for r in records:
        try:
            items = decode_record(r.value)
        except RecordDecodeError as e:
            batch.report(r, -1, "unreadable_record", str(e))
            continue
        for index, item in enumerate(items):
            try:
                ev = _SUBSCRIPTION.validate_python(item)
            except ValidationError as err:
                batch.report(r, index, "invalid_event", format_validation_error(err), item)
                continue
            history.append(history_row(ev, record_time(r), r.topic, r.partition, r.offset,
                                       index))
            rows.append((r, index, item, (
                ev.subject, ev.data.plan_id, _STATUS[ev.type], ev.data.period_start,
                ev.data.period_end, ev.data.stripe_customer_id,
                ev.data.stripe_subscription_id, ev.time)))
    # Last write wins in log order; updated_at is the event's time, not now(), so a
    # rebuild reproduces it.
    write_rows(
        conn, batch,
        f"INSERT INTO {schema}.subscriptions AS s (tenant_id, plan_id, status,"
        " current_period_start, current_period_end, stripe_customer_id,"
        " stripe_subscription_id, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
        " ON CONFLICT (tenant_id) DO UPDATE SET plan_id = excluded.plan_id,"
        " status = excluded.status,"
        " current_period_start = excluded.current_period_start,"
        " current_period_end = excluded.current_period_end,"
        " stripe_customer_id = coalesce(excluded.stripe_customer_id, s.stripe_customer_id),"
        " stripe_subscription_id = coalesce(excluded.stripe_subscription_id,"
        " s.stripe_subscription_id), updated_at = excluded.updated_at",
        rows,
    )
    write_history(conn, history, schema)

def project_quota_states(conn: Connection, batch: Batch, records: Records, schema: str) -> None:
    """`tally.quota_state` from the compacted quota-state topic."""
    # A compacted topic: only the latest value per key matters, and a tombstone deletes
    # (a rebuild after compaction sees no record for that key at all).
    latest: dict[tuple[str, str], tuple[QuotaState, Record] | None] = {}
    for r in records:
        if r.value is None:
            tenant, _, meter = (r.key or b"").decode("utf-8", "replace").rpartition("/")
            latest[(tenant, meter)] = None
            continue
        try:
            q = QuotaState.model_validate(loads(r.value))
        except (ValueError, ValidationError) as e:
            detail = format_validation_error(e) if isinstance(e, ValidationError) else str(e)
            batch.report(r, -1, "invalid_quota_state", detail)
            continue
        latest[(q.tenant_id, q.meter)] = (q, r)
    with conn.cursor() as cur:
        cur.executemany(
            f"DELETE FROM {schema}.quota_state WHERE tenant_id = %s AND meter = %s",
            [key for key, value in latest.items() if value is None],
        )
    # updated_at is the record's timestamp, so a rebuild reproduces it.
    write_rows(
        conn, batch,
        f'INSERT INTO {schema}.quota_state (tenant_id, meter, period_start, used,'
        ' "limit", state, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s)'
        " ON CONFLICT (tenant_id, meter) DO UPDATE SET"
        ' period_start = excluded.period_start, used = excluded.used,'
        ' "limit" = excluded."limit", state = excluded.state,'
        " updated_at = excluded.updated_at",
        [(r, -1, None, (q.tenant_id, q.meter, q.period_start, q.used, q.limit, q.state,
                        record_time(r)))
         for value in latest.values() if value is not None for q, r in [value]],
    )

def project_plans(conn: Connection, batch: Batch, records: Records, schema: str) -> None:
    """The plan catalog tables from the compacted `tally.plans`."""
    # Compacted too: each key's latest value replaces what it described.
    latest: dict[str, Record] = {}
    for r in records:
        latest[(r.key or b"").decode("utf-8", "replace")] = r
    for key, r in latest.items():
        try:
            with conn.transaction():  # a savepoint: a refused plan leaves the rest
                _project_plan(conn, key, r, schema)
        except ValidationError as e:
            batch.report(r, -1, "invalid_plan", format_validation_error(e))
        except (ValueError, TypeError, KeyError) as e:
            batch.report(r, -1, "unreadable_record", repr(e))
        except REJECTED as e:
            batch.report(r, -1, "rejected_by_database", str(e).splitlines()[0])

def _project_plan(conn: Connection, key: str, r: Record, schema: str) -> None:
    s = schema
    document = loads(r.value) if r.value is not None else None
    if key == METERS_KEY:
        meters = _METERS.validate_python(document["meters"]) if document else {}
        conn.execute(f"DELETE FROM {s}.meters")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {s}.meters (meter, aggregation, unit,"
                " unique_dimension, lateness_seconds) VALUES (%s,%s,%s,%s,%s)",
                [(name, m.aggregation, m.unit, m.unique_dimension,
                  m.lateness_seconds) for name, m in sorted(meters.items())],
            )
        # The record as published: with the plans' documents, the catalog's copy that
        # `restore_catalog` publishes back to an empty topic (runtime/plans.py).
        conn.execute(f"DELETE FROM {s}.catalog_settings WHERE key = %s", (key,))
        if document:
            conn.execute(f"INSERT INTO {s}.catalog_settings (key, document) VALUES (%s, %s)",
                         (key, r.value.decode() if r.value else "null"))
        return
    plan = Plan.model_validate(document) if document is not None else None
    conn.execute(f"DELETE FROM {s}.plan_meters WHERE plan_id = %s", (key,))
    conn.execute(f"DELETE FROM {s}.plans WHERE plan_id = %s", (key,))
    if plan is None:
        return
    conn.execute(
        f"INSERT INTO {s}.plans (plan_id, name, currency, monthly_fee_cents,"
        " yearly_fee_cents, minimum_cents, tier, document)"
        " VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
        (key, plan.name, plan.currency, plan.monthly_fee_cents, plan.yearly_fee_cents,
         plan.minimum_cents, plan.tier, r.value.decode() if r.value else "null"),
    )
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {s}.plan_meters (plan_id, meter, included, hard_limit,"
            " overage) VALUES (%s,%s,%s,%s,%s)",
            [(key, meter, pm.included, pm.hard_limit,
              pm.overage.model_dump_json() if pm.overage else None)
             for meter, pm in sorted(plan.meters.items())],
        )
