"""Prometheus metrics of the billing jobs."""

from prometheus_client import Counter, Gauge, Histogram

STRIPE_CALLS = Counter("tally_billing_stripe_calls_total", "Stripe calls by kind and outcome",
                       ["kind", "outcome"])
PUSH_ERRORS = Counter("tally_billing_push_errors_total", "Tenants/meters a job could not push",
                      ["job", "reason"])
RECONCILE_MISMATCHES = Gauge("tally_billing_reconcile_mismatches",
                             "Mismatches found by the last reconcile run")
JOB_RUNS = Counter("tally_billing_job_runs_total", "Scheduled job runs by outcome",
                   ["job", "outcome"])
JOB_SECONDS = Histogram("tally_billing_job_seconds", "Duration of scheduled job runs", ["job"])
JOB_LAST_SUCCESS = Gauge("tally_billing_job_last_success_timestamp_seconds",
                         "When each job last finished without failures", ["job"])
WEBHOOKS = Counter("tally_billing_webhooks_total", "Stripe webhook deliveries by outcome",
                   ["type", "outcome"])
METER_EVENT_REJECTIONS = Counter(
    "tally_billing_meter_event_rejections_total",
    "Meter events Stripe accepted, then rejected (meter error reports), by error code",
    ["code"])
WEBHOOKS_UNUSABLE = Counter(
    "tally_billing_webhooks_unusable_total",
    "Signed Stripe events Tally cannot use, recorded in tally.stripe_webhook_unusable and "
    "acknowledged: unmapped (no Tally tenant, plan or period) or malformed (unexpected shape)",
    ["cause"],
)
BILLING_SKIPPED = Counter("tally_billing_tenants_skipped_total",
                          "Tenants the invoice job could not invoice, by error",
                          ["error"])
