-- The ledger keeps each event's place in the log, and tally.usage_as_of folds every
-- aggregation kind as domain/meters.py defines it, `latest` ties included.

-- Where an event stands in `tally.usage.accepted`: the offset of its record (in the
-- partition of its tenant: a tenant's events are all on one) and its index in the record.
-- It orders `latest` ties on event time in the ledger as in the worker and the rollups:
-- the later one in the log wins (004 broke them by ingestion time, then event id).
-- Rows projected before this migration have none; `tally projections rebuild` fills it.
ALTER TABLE tally.usage_events
    ADD COLUMN log_offset bigint,
    ADD COLUMN log_index  int;

-- Usage per tenant, meter and period as the ledger stood at `p_as_of` (by ingestion time,
-- which is the source record's Kafka timestamp, so the answer does not change on replay).
-- The quantity is `domain.meters.ledger_value_sql()`, each kind's `ledger_sql`: a kind
-- added there needs a migration that recreates this function (a test checks the newest
-- one). Replacing the function keeps its grant to tally_finance (004).
CREATE OR REPLACE FUNCTION tally.usage_as_of(p_as_of timestamptz, p_tenant text DEFAULT NULL)
RETURNS TABLE (tenant_id text, meter text, period_start timestamptz, quantity numeric,
               event_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT e.tenant_id, e.meter, e.period_start,
           CASE min(aggregation)
               WHEN 'sum' THEN sum(quantity)
               WHEN 'count' THEN count(*)::numeric
               WHEN 'max' THEN max(quantity)
               WHEN 'unique_count' THEN count(DISTINCT unique_value)::numeric
               WHEN 'latest' THEN (array_agg(quantity ORDER BY event_time DESC,
                   log_offset DESC NULLS LAST, log_index DESC NULLS LAST, ingested_at DESC,
                   event_id DESC))[1]
           END,
           count(*)
    FROM tally.usage_events e
    WHERE e.ingested_at <= p_as_of AND (p_tenant IS NULL OR e.tenant_id = p_tenant)
    GROUP BY e.tenant_id, e.meter, e.period_start
$$;
