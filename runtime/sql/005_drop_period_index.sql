-- usage_events_tenant_period (001) served no query: per-period questions go to
-- usage_by_period, audits to usage_events_tenant_time. Every ledger index is paid for on
-- each insert, so it goes.
DROP INDEX IF EXISTS tally.usage_events_tenant_period;
