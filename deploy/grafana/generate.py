"""Tally's Grafana dashboards as code (grafana-foundation-sdk).

    python deploy/grafana/generate.py           # rewrite deploy/grafana/dashboards/*.json
    python deploy/grafana/generate.py --check   # exit 1 when a committed file is stale

The JSON files are committed and provisioned by Grafana (provisioning/); this script is
their source. Every Prometheus query names only metrics Tally exports (or that the
Prometheus server and kafka-exporter beside it export), every SQL query reads only what
the read-only finance role `tally_finance` may read (runtime/sql/004_finance_access.sql):
tests/deploy checks both, running the SQL as that role on a migrated database.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import prometheus as prom_builders
from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).resolve().parent / "dashboards"

# The uids the provisioned data sources carry (provisioning/datasources/tally.yml).
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="tally-prometheus")
POSTGRES = DataSourceRef(type_val="grafana-postgresql-datasource", uid="tally-postgres")

RATE = "$__rate_interval"


class SqlQuery(cogvariants.Dataquery):
    """A raw SQL query of Grafana's PostgreSQL data source (the SDK has no model for it)."""

    def __init__(self, ref_id: str, raw_sql: str, format_val: str) -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.format_val = format_val

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref_id,
            "datasource": POSTGRES.to_json(),
            "editorMode": "code",
            "format": self.format_val,
            "rawQuery": True,
            "rawSql": self.raw_sql,
        }


class Sql(cogbuilder.Builder[cogvariants.Dataquery]):
    """Builder of a SqlQuery. `time_series` wants a `time` column; otherwise `table`."""

    def __init__(self, raw_sql: str, *, time_series: bool = False) -> None:
        self._query = SqlQuery("A", " ".join(raw_sql.split()),
                               "time_series" if time_series else "table")

    def build(self) -> cogvariants.Dataquery:
        return self._query


def q(expr: str, legend: str = "") -> prom_builders.Dataquery:
    """A Prometheus range query."""
    query = prom_builders.Dataquery().expr(expr).datasource(PROMETHEUS)
    return query.legend_format(legend) if legend else query


def _ids(targets: tuple[cogbuilder.Builder[cogvariants.Dataquery], ...]
         ) -> list[cogbuilder.Builder[cogvariants.Dataquery]]:
    """Give each target its own refId (A, B, ...)."""
    for index, target in enumerate(targets):
        built = target.build()
        if hasattr(built, "ref_id"):
            built.ref_id = chr(ord("A") + index)
    return list(targets)


def graph(title: str, description: str, *targets: cogbuilder.Builder[cogvariants.Dataquery],
          unit: str = "short", span: int = 12, stacked: bool = False,
          sql: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .span(span).height(8).fill_opacity(10)
             .datasource(POSTGRES if sql else PROMETHEUS).targets(_ids(targets)))
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    return panel


def number(title: str, description: str, target: cogbuilder.Builder[cogvariants.Dataquery],
           unit: str = "short", span: int = 6, sql: bool = False) -> stat.Panel:
    # A SQL stat shows every row (one per currency, say); a Prometheus one the last value.
    reduce = (common_builders.ReduceDataOptions().values(True).calcs([]) if sql
              else common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
    return (stat.Panel().title(title).description(description).unit(unit).span(span).height(5)
            .datasource(POSTGRES if sql else PROMETHEUS).targets(_ids((target,)))
            .graph_mode(common.BigValueGraphMode.NONE).reduce_options(reduce))


def bars(title: str, description: str, target: cogbuilder.Builder[cogvariants.Dataquery],
         unit: str = "short", span: int = 12, sql: bool = True) -> bargauge.Panel:
    return (bargauge.Panel().title(title).description(description).unit(unit).span(span)
            .height(8).datasource(POSTGRES if sql else PROMETHEUS).targets(_ids((target,)))
            .reduce_options(common_builders.ReduceDataOptions().values(True).calcs([])))


def rows(title: str, description: str, target: cogbuilder.Builder[cogvariants.Dataquery],
         span: int = 24, sql: bool = True) -> table.Panel:
    return (table.Panel().title(title).description(description).span(span).height(9)
            .datasource(POSTGRES if sql else PROMETHEUS).targets(_ids((target,))))


def dashboard(uid: str, title: str, description: str) -> Dashboard:
    return (Dashboard(title).uid(uid).description(description).tags(["tally"])
            .refresh("30s").time("now-6h", "now").timezone("utc").readonly())


def p99(histogram: str, by: str = "") -> str:
    group = f"le, {by}" if by else "le"
    return (f"histogram_quantile(0.99, sum by ({group}) "
            f"(rate({histogram}_bucket[{RATE}])))")


# --- Pipeline -----------------------------------------------------------------------


def pipeline() -> Dashboard:
    return (
        dashboard("tally-pipeline", "Tally / Pipeline",
                  "Ingest to Postgres: rates, lag per stage, dead letters, dedup, latency.")
        .with_row(Row("Stages"))
        .with_panel(number("Stages up", "1 per scraped Tally process that answers /metrics "
                           "(alert TallyStageDown).", q('up{job=~"tally-.*"}', "{{job}} "
                                                      "{{instance}}"), span=24))
        .with_row(Row("Ingest"))
        .with_panel(graph(
            "Events in", "Events accepted and rejected by the ingest gateway, and events the "
            "producer SDK (in the gateway and in services) got acknowledged by Kafka.",
            q(f"sum by (outcome) (rate(tally_gateway_events_total[{RATE}]))",
              "gateway {{outcome}}"),
            q(f"sum by (topic) (rate(tally_producer_events_sent_total[{RATE}]))",
              "SDK acked {{topic}}"),
            q(f"sum by (topic) (rate(tally_producer_events_failed_total[{RATE}]))",
              "SDK failed {{topic}}"),
            unit="ops"))
        .with_panel(graph(
            "Gateway requests by status", "HTTP answers of the ingest gateway (503: neither "
            "Kafka nor the spool took the events; clients retry with the same ids).",
            q(f"sum by (status) (rate(tally_gateway_requests_total[{RATE}]))", "{{status}}"),
            unit="reqps", stacked=True))
        .with_panel(graph(
            "Producer spool", "Records waiting in local spools because Kafka did not take "
            "them (alert TallyProducerSpooling); events buffered in memory.",
            q("sum by (instance) (tally_producer_spooled_records)", "spooled {{instance}}"),
            q("sum by (instance) (tally_producer_buffered_events)", "buffered {{instance}}")))
        .with_panel(graph(
            "Producer send time p99", "From sealing a batch record to Kafka's acknowledgement.",
            q(p99("tally_producer_send_seconds"), "p99"), unit="s"))
        .with_row(Row("Worker"))
        .with_panel(graph(
            "Usage events by outcome", "counted, duplicate (dedup hit) and dead (sent to the "
            "DLQ) events, as the worker decided them.",
            q(f"sum by (outcome) (rate(tally_worker_events_total[{RATE}]))", "{{outcome}}"),
            unit="ops", stacked=True))
        .with_panel(graph(
            "Dedup hits", "Share of usage events that were redeliveries of an event already "
            "counted; and event ids held in the dedup windows.",
            q(f'sum(rate(tally_worker_events_total{{outcome="duplicate"}}[{RATE}])) / '
              f"sum(rate(tally_worker_events_total[{RATE}]))", "duplicate share"),
            unit="percentunit", span=8))
        .with_panel(graph(
            "Dedup window", "Event ids held for dedup, per partition (bounded).",
            q("sum by (partition) (tally_worker_dedup_ids)", "partition {{partition}}"),
            span=8))
        .with_panel(graph(
            "Dead letters by reason", "Records sent to tally.usage.dlq (alert "
            "TallyDeadLettersGrowing).",
            q(f"sum by (reason) (rate(tally_worker_dead_letters_total[{RATE}]))", "{{reason}}"),
            unit="ops", span=8))
        .with_panel(graph(
            "Worker batch time p99", "Time to process one micro-batch and encode its effects.",
            q(p99("tally_worker_batch_seconds"), "p99"), unit="s", span=8))
        .with_panel(graph(
            "Pre-batching: records on the checked path", "Share of tally.usage records the "
            "pre-batching stage checked into rows; the rest cost the agent's core more.",
            q(f"sum(rate(tally_worker_prebatch_checked_total[{RATE}])) / "
              f"sum(rate(tally_worker_prebatch_records_total[{RATE}]))", "checked share"),
            unit="percentunit", span=8))
        .with_panel(number("Plans in the worker's catalog", "Plans the worker rates with.",
                           q("max(tally_worker_catalog_plans)"), span=8))
        .with_row(Row("Lag and latency"))
        .with_panel(graph(
            "Consumer lag: Kafka-committed groups", "Records behind the log end for the "
            "groups that commit to Kafka: the worker (tally-worker), its pre-batching stage "
            "(tally-worker-prebatch) and the notifier (tally.notifier). From kafka-exporter.",
            q('sum by (consumergroup, topic) (kafka_consumergroup_lag{consumergroup=~"tally.*"})',
              "{{consumergroup}} {{topic}}")))
        .with_panel(graph(
            "Consumer lag: projector", "Records behind the log end per topic; the projector "
            "keeps its offsets in Postgres, so Kafka's group lag does not see it.",
            q("sum by (topic) (tally_projection_lag_records)", "{{topic}}")))
        .with_panel(graph(
            "Latency by leg", "Producer to Kafka (p99 ack), worker batch (p99), and the age "
            "of the last record the projector wrote to Postgres, per topic (0 when caught "
            "up). Together: how long an event takes to reach the read models.",
            q(p99("tally_producer_send_seconds"), "producer → Kafka p99"),
            q(p99("tally_worker_batch_seconds"), "worker batch p99"),
            q("max by (topic) (tally_projection_lag_seconds)", "→ Postgres {{topic}}"),
            unit="s", span=24))
        .with_row(Row("Projector"))
        .with_panel(graph(
            "Projected", "Records projected per topic, new ledger rows.",
            q(f"sum by (topic) (rate(tally_projection_records_total[{RATE}]))", "{{topic}}"),
            q(f"sum(rate(tally_projection_rows_total[{RATE}]))", "ledger rows"),
            unit="ops", span=8))
        .with_panel(graph(
            "Projection errors and fencing", "Records reported to tally.projection_errors "
            "(alert TallyProjectionErrors); batches discarded because the stored offsets "
            "moved (a rebuild swap or a second projector).",
            q(f"sum by (topic, reason) (rate(tally_projection_errors_total[{RATE}]))",
              "{{topic}} {{reason}}"),
            q(f"sum(rate(tally_projection_fenced_total[{RATE}]))", "fenced"),
            unit="ops", span=8))
        .with_panel(graph(
            "Projection transaction p99", "One batch of rows and its offsets, one transaction.",
            q(p99("tally_projection_write_seconds"), "p99"), unit="s", span=8))
        .with_row(Row("Notifier and quota views"))
        .with_panel(graph(
            "Notifications", "Threshold notifications delivered (2xx), retried and given up.",
            q(f"sum by (kind) (rate(tally_notifier_delivered_total[{RATE}]))",
              "delivered {{kind}}"),
            q(f"sum by (cause) (rate(tally_notifier_retried_total[{RATE}]))", "retried {{cause}}"),
            q(f"sum by (reason) (rate(tally_notifier_failed_total[{RATE}]))", "failed {{reason}}"),
            unit="ops", span=8))
        .with_panel(graph(
            "Customer alerts", "Tenants' channels (e-mail, Slack, webhooks): delivered, "
            "retried, skipped as already delivered (replays), and dead letters "
            "(tally.notification_dead_letters).",
            q(f"sum by (channel) (rate(tally_notifier_channel_delivered_total[{RATE}]))",
              "delivered {{channel}}"),
            q(f"sum by (channel, cause) (rate(tally_notifier_channel_retried_total[{RATE}]))",
              "retried {{channel}} {{cause}}"),
            q(f"sum by (channel) (rate(tally_notifier_channel_duplicates_total[{RATE}]))",
              "replayed {{channel}}"),
            q(f"sum by (channel, reason) (rate(tally_notifier_dead_letters_total[{RATE}]))",
              "dead {{channel}} {{reason}}"),
            unit="ops", span=8))
        .with_panel(graph(
            "Notification delivery p99", "From the first attempt to a 2xx answer.",
            q(p99("tally_notifier_delivery_seconds"), "p99"), unit="s", span=8))
        .with_panel(graph(
            "Quota views", "Quota-state records applied by QuotaViews (the worker's /quota "
            "and services that embed one), and the keys they hold (alert "
            "TallyQuotaStateStale).",
            q(f"sum by (outcome) (rate(tally_quota_view_records_total[{RATE}]))", "{{outcome}}"),
            q("sum by (instance) (tally_quota_view_keys)", "keys {{instance}}"),
            span=8))
    )


# --- Usage --------------------------------------------------------------------------

_CURRENT_PERIOD = "period_start <= now() AND period_end > now()"


def usage() -> Dashboard:
    return (
        dashboard("tally-usage", "Tally / Usage",
                  "What tenants use, by meter, from the read models; who is near a limit.")
        .with_panel(graph(
            "Events counted", "Usage events the worker counted (Prometheus).",
            q(f'sum(rate(tally_worker_events_total{{outcome="counted"}}[{RATE}]))', "counted"),
            unit="ops", span=24))
        .with_panel(graph(
            "Quantity by meter per day", "tally.usage_daily, all tenants (each meter in its "
            "own unit).",
            Sql("""SELECT day::timestamptz AS "time", meter, sum(quantity) AS quantity
                   FROM tally.usage_daily WHERE $__timeFilter(day)
                   GROUP BY 1, 2 ORDER BY 1""", time_series=True),
            sql=True))
        .with_panel(graph(
            "Events by meter per day", "tally.usage_daily event counts, all tenants.",
            Sql("""SELECT day::timestamptz AS "time", meter, sum(event_count) AS events
                   FROM tally.usage_daily WHERE $__timeFilter(day)
                   GROUP BY 1, 2 ORDER BY 1""", time_series=True),
            sql=True))
        .with_panel(rows(
            "This period by meter", "tally.usage_by_period for the periods under way.",
            Sql(f"""SELECT meter, count(DISTINCT tenant_id) AS tenants,
                    sum(quantity) AS quantity, sum(event_count) AS events
                    FROM tally.usage_by_period WHERE {_CURRENT_PERIOD}
                    GROUP BY meter ORDER BY meter"""), span=12))
        .with_panel(bars(
            "Quota states", "tally.quota_state: tenant/meter pairs per state.",
            Sql("""SELECT state, count(*) AS pairs FROM tally.quota_state
                   GROUP BY state ORDER BY state"""), span=12))
        .with_panel(rows(
            "Tenants near or over their limits", "tally.quota_state rows not `ok`: blocked "
            "first, then by share of the hard limit.",
            Sql("""SELECT tenant_id, meter, state, used, "limit",
                   round(100 * used / nullif("limit", 0), 1) AS pct_of_limit, updated_at
                   FROM tally.quota_state WHERE state <> 'ok'
                   ORDER BY CASE state WHEN 'blocked' THEN 0 WHEN 'exceeded' THEN 1 ELSE 2 END,
                   pct_of_limit DESC NULLS LAST LIMIT 100""")))
        .with_panel(rows(
            "Top tenants this period", "The 20 largest tenant/meter totals of the periods "
            "under way, with the plan they are rated on.",
            Sql(f"""SELECT tenant_id, meter, plan_id, quantity, event_count
                    FROM tally.usage_by_period WHERE {_CURRENT_PERIOD}
                    ORDER BY quantity DESC LIMIT 20""")))
    )


# --- Billing overview ---------------------------------------------------------------

_ISSUED = "status IN ('open', 'paid', 'payment_failed', 'uncollectible')"


def billing() -> Dashboard:
    return (
        dashboard("tally-billing", "Tally / Billing overview",
                  "Invoices, Stripe pushes, reconciliation and the scheduled jobs.")
        .with_panel(number(
            "Invoices issued", "Finalized invoices created in the time range.",
            Sql(f"SELECT count(*) AS invoices FROM tally.invoices "
                f"WHERE {_ISSUED} AND $__timeFilter(created_at)"), sql=True))
        .with_panel(number(
            "Reconcile mismatches", "Mismatches found by the last reconcile run (alert "
            "TallyReconcileMismatch).", q("max(tally_billing_reconcile_mismatches)")))
        .with_panel(number(
            "Stripe call failures (1h)", "Stripe calls given up on or never made, last hour "
            "(alert TallyStripePushFailures).",
            q('sum(increase(tally_billing_stripe_calls_total{outcome!~"succeeded|retried"}[1h]))')))
        .with_panel(number(
            "Unpaid invoices", "Finalized, not paid.",
            Sql("SELECT count(*) AS unpaid FROM tally.invoices "
                "WHERE status IN ('open', 'payment_failed', 'uncollectible')"), sql=True))
        .with_panel(graph(
            "Invoices per day by status", "tally.invoices by creation day.",
            Sql("""SELECT date_trunc('day', created_at) AS "time", status, count(*) AS invoices
                   FROM tally.invoices WHERE $__timeFilter(created_at)
                   GROUP BY 1, 2 ORDER BY 1""", time_series=True),
            sql=True, stacked=True))
        .with_panel(rows(
            "Amounts by plan", "Finalized invoices whose period starts in the range, per "
            "plan and currency.",
            Sql(f"""SELECT coalesce(plan_id, '(unknown)') AS plan, currency,
                    count(*) AS invoices, sum(total_cents) / 100.0 AS total
                    FROM tally.invoices WHERE {_ISSUED} AND $__timeFilter(period_start)
                    GROUP BY 1, 2 ORDER BY 4 DESC"""), span=12))
        .with_panel(graph(
            "Stripe calls by kind and outcome", "Per hour.",
            q("sum by (kind, outcome) (increase(tally_billing_stripe_calls_total[1h]))",
              "{{kind}} {{outcome}}")))
        .with_panel(graph(
            "Stripe push failures", "Calls that failed or could not be made, and tenants or "
            "meters a job could not push (by job and error).",
            q('sum by (kind, outcome) (increase(tally_billing_stripe_calls_total'
              '{outcome!~"succeeded|retried"}[1h]))', "{{kind}} {{outcome}}"),
            q("sum by (exported_job, reason) (increase(tally_billing_push_errors_total[1h]))",
              "{{exported_job}} {{reason}}")))
        .with_panel(graph(
            "Job runs by outcome", "ok, failures, error, or locked (another scheduler ran "
            "it). The jobs' `job` label is stored as exported_job beside the scrape job.",
            q("sum by (exported_job, outcome) (increase(tally_billing_job_runs_total[1h]))",
              "{{exported_job}} {{outcome}}"), stacked=True))
        .with_panel(graph(
            "Since each job's last success", "Alert TallyBillingJobFailing fires on runs "
            "that keep failing.",
            q("time() - max by (exported_job) "
              "(tally_billing_job_last_success_timestamp_seconds)", "{{exported_job}}"),
            unit="s"))
        .with_panel(graph(
            "Job duration p99", "Per job.",
            q(p99("tally_billing_job_seconds", "exported_job"), "{{exported_job}}"), unit="s"))
        .with_panel(graph(
            "Stripe webhooks", "Deliveries by event type and outcome, per hour.",
            q("sum by (type, outcome) (increase(tally_billing_webhooks_total[1h]))",
              "{{type}} {{outcome}}")))
        .with_panel(rows(
            "Unpaid invoices", "Finalized invoices not paid, oldest period first.",
            Sql("""SELECT invoice_id, tenant_id, period_start, currency,
                   total_cents / 100.0 AS total, status, stripe_invoice_id
                   FROM tally.invoices WHERE status IN ('open', 'payment_failed', 'uncollectible')
                   ORDER BY period_start, invoice_id LIMIT 100""")))
    )


# --- Subscriptions and revenue ------------------------------------------------------

# Monthly recurring revenue from subscription fees: a plan's monthly fee, or a twelfth of
# its yearly fee for subscriptions whose current period is longer than a month (the read
# model keeps the period, not the billing interval). Usage charges are not recurring.
_MRR = """CASE WHEN s.current_period_end - s.current_period_start > interval '32 days'
          THEN coalesce(p.yearly_fee_cents, p.monthly_fee_cents * 12) / 12
          ELSE p.monthly_fee_cents END"""
_LIVE = "s.status <> 'canceled'"
# Each tenant's latest invoice with a plan: the plan it was last billed on.
_LAST_INVOICED = """WITH last_invoice AS (
    SELECT DISTINCT ON (tenant_id) tenant_id, plan_id
    FROM tally.invoices WHERE plan_id IS NOT NULL ORDER BY tenant_id, period_start DESC)"""


def revenue() -> Dashboard:
    return (
        dashboard("tally-revenue", "Tally / Subscriptions and revenue",
                  "Active subscriptions by plan, trials, plan changes, cancellations, MRR "
                  "and invoiced revenue, from the read models.")
        .with_panel(number(
            "MRR (subscription fees)", "Sum over subscriptions not canceled of the plan's "
            "monthly fee (a twelfth of the yearly fee on yearly periods), per currency.",
            Sql(f"""SELECT p.currency, sum({_MRR}) / 100.0 AS mrr
                    FROM tally.subscriptions s JOIN tally.plans p USING (plan_id)
                    WHERE {_LIVE} GROUP BY p.currency ORDER BY p.currency"""),
            unit="none", sql=True))
        .with_panel(number(
            "Active subscriptions", "tally.subscriptions not canceled.",
            Sql(f"SELECT count(*) AS active FROM tally.subscriptions s WHERE {_LIVE}"),
            sql=True))
        .with_panel(number(
            "Canceled in range", "Subscriptions whose cancellation is their latest event, "
            "canceled in the time range.",
            Sql("SELECT count(*) AS canceled FROM tally.subscriptions "
                "WHERE status = 'canceled' AND $__timeFilter(updated_at)"), sql=True))
        .with_panel(number(
            "Plan changes since last invoice", "Subscriptions now on another plan than "
            "their latest invoice.",
            Sql(f"""{_LAST_INVOICED}
                    SELECT count(*) AS changed FROM tally.subscriptions s
                    JOIN last_invoice li USING (tenant_id)
                    WHERE {_LIVE} AND s.plan_id <> li.plan_id"""), sql=True))
        .with_panel(number(
            "In trial now", "Subscription segments in their trial at this moment, as the "
            "invoice job last derived them from the subscription history.",
            Sql("""SELECT count(*) AS trialing FROM tally.subscription_segments
                   WHERE status = 'trialing' AND valid_from <= now()
                   AND (valid_to IS NULL OR valid_to > now())"""), sql=True))
        .with_panel(rows(
            "Trials ending in the next 7 days", "Tenant, plan and trial end of every trial "
            "that ends within a week: the tenants about to pay their first fee.",
            Sql("""SELECT tenant_id, plan_id, trial_end FROM tally.subscription_segments
                   WHERE status = 'trialing' AND trial_end > now()
                   AND trial_end <= now() + interval '7 days'
                   AND (valid_to IS NULL OR valid_to > now())
                   ORDER BY trial_end LIMIT 100""")))
        .with_panel(bars(
            "Active subscriptions by plan", "tally.subscriptions not canceled, per plan.",
            Sql(f"""SELECT p.name AS plan, count(*) AS subscriptions
                    FROM tally.subscriptions s JOIN tally.plans p USING (plan_id)
                    WHERE {_LIVE} GROUP BY p.name, p.tier ORDER BY p.tier""")))
        .with_panel(bars(
            "MRR by plan", "Subscription fees per month, per plan and currency.",
            Sql(f"""SELECT p.name || ' (' || p.currency || ')' AS plan,
                    sum({_MRR}) / 100.0 AS mrr
                    FROM tally.subscriptions s JOIN tally.plans p USING (plan_id)
                    WHERE {_LIVE} GROUP BY p.name, p.currency, p.tier ORDER BY p.tier""")))
        .with_panel(graph(
            "Cancellations per day", "Subscriptions whose latest event is a cancellation, by "
            "the day of that event.",
            Sql("""SELECT date_trunc('day', updated_at) AS "time", count(*) AS canceled
                   FROM tally.subscriptions
                   WHERE status = 'canceled' AND $__timeFilter(updated_at)
                   GROUP BY 1 ORDER BY 1""", time_series=True),
            sql=True))
        .with_panel(graph(
            "Subscription events from Stripe", "customer.subscription.* webhooks received, "
            "by type, per day.",
            q('sum by (type) (increase(tally_billing_webhooks_total'
              '{type=~"customer.subscription.*"}[1d]))', "{{type}}")))
        .with_panel(rows(
            "Upgrades and downgrades", "Subscriptions now on another plan than their latest "
            "invoice, by plan tier.",
            Sql(f"""{_LAST_INVOICED}
                    SELECT s.tenant_id, li.plan_id AS invoiced_plan, s.plan_id AS current_plan,
                    CASE WHEN now_p.tier > was_p.tier THEN 'upgrade'
                         WHEN now_p.tier < was_p.tier THEN 'downgrade' ELSE 'change' END
                         AS direction,
                    s.updated_at
                    FROM tally.subscriptions s JOIN last_invoice li USING (tenant_id)
                    JOIN tally.plans now_p ON now_p.plan_id = s.plan_id
                    JOIN tally.plans was_p ON was_p.plan_id = li.plan_id
                    WHERE {_LIVE} AND s.plan_id <> li.plan_id
                    ORDER BY s.updated_at DESC LIMIT 100""")))
        .with_panel(rows(
            "Invoiced revenue by month", "Finalized invoices (open or paid) per month of the "
            "billing period and currency, as docs/finance.md counts revenue.",
            Sql("""SELECT date_trunc('month', period_start AT TIME ZONE 'UTC')::date AS month,
                   currency, count(*) AS invoices, sum(total_cents) / 100.0 AS total
                   FROM tally.invoices WHERE status IN ('open', 'paid')
                   GROUP BY 1, 2 ORDER BY 1 DESC, 2 LIMIT 36""")))
    )


DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "pipeline": pipeline,
    "usage": usage,
    "billing": billing,
    "revenue": revenue,
}


def render(board: Dashboard) -> str:
    return json.dumps(board.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed files instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, make in DASHBOARDS.items():
        path = OUT / f"{name}.json"
        text = render(make())
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python deploy/grafana/generate.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
