"""Prometheus metrics of the billing jobs."""

from prometheus_client import Counter

STRIPE_CALLS = Counter("tally_billing_stripe_calls_total", "Stripe calls by kind and outcome",
                       ["kind", "outcome"])
PUSH_ERRORS = Counter("tally_billing_push_errors_total", "Tenants/meters a job could not push",
                      ["job", "reason"])
