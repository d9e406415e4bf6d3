-- As-of usage for audits, and the read-only role finance queries with.

-- Usage per tenant, meter and period as the ledger stood at `p_as_of` (by ingestion time,
-- which is the source record's Kafka timestamp, so the answer does not change on replay).
-- Audits an invoice already sent: rows ingested after it cannot move its figures.
-- Each meter folds as in the rollups. `latest` ties on event time are broken by ingestion
-- time then event id (the ledger has no log position); the rollups break them by log order.
-- LANGUAGE sql with a string body binds table names when called, so it keeps working
-- after `tally projections rebuild` replaces the tables' contents.
CREATE OR REPLACE FUNCTION tally.usage_as_of(p_as_of timestamptz, p_tenant text DEFAULT NULL)
RETURNS TABLE (tenant_id text, meter text, period_start timestamptz, quantity numeric,
               event_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT e.tenant_id, e.meter, e.period_start,
           CASE min(e.aggregation)
               WHEN 'count' THEN count(*)::numeric
               WHEN 'max' THEN max(e.quantity)
               WHEN 'unique_count' THEN count(DISTINCT e.unique_value)::numeric
               WHEN 'latest' THEN (array_agg(e.quantity
                   ORDER BY e.event_time DESC, e.ingested_at DESC, e.event_id DESC))[1]
               ELSE sum(e.quantity)
           END,
           count(*)
    FROM tally.usage_events e
    WHERE e.ingested_at <= p_as_of AND (p_tenant IS NULL OR e.tenant_id = p_tenant)
    GROUP BY e.tenant_id, e.meter, e.period_start
$$;

-- tally_finance: NOLOGIN, granted to people/services (`GRANT tally_finance TO alice`).
-- Roles are cluster-wide while migrations run per database: many databases on one server
-- (tests, tenants of a shared cluster) may run this at once, and the per-database advisory
-- lock of migrations.py does not serialise them, so a lost race is caught, not fatal.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tally_finance') THEN
        BEGIN
            CREATE ROLE tally_finance NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created concurrently by another database's migration
        END;
    END IF;
END
$$;

-- What finance reads: the read models and the plan catalog, invoices, as-of usage.
-- Not granted: projection internals (projection_offsets, usage_event_keys, the *_uniques
-- helpers, projection_errors), stripe_pushes (request journal with API details),
-- schema_migrations. SELECT only: no INSERT/UPDATE/DELETE/TRUNCATE anywhere.
GRANT USAGE ON SCHEMA tally TO tally_finance;
GRANT SELECT ON tally.usage_events, tally.usage_daily, tally.usage_by_period,
    tally.subscriptions, tally.quota_state, tally.meters, tally.plans, tally.plan_meters,
    tally.invoices, tally.invoice_lines TO tally_finance;
GRANT EXECUTE ON FUNCTION tally.usage_as_of(timestamptz, text) TO tally_finance;
