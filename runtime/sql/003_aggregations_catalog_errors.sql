-- Every meter aggregation in the rollups, the plan catalog, bad-input reports and the
-- indexes behind the finance cookbook (docs/finance.md, projections/cookbook.sql).

-- The ledger keeps what the rollups fold by, so an as-of query over the ledger
-- (tally.usage_as_of, 004) can fold each meter the way the worker did.
ALTER TABLE tally.usage_events
    ADD COLUMN aggregation  text NOT NULL DEFAULT 'sum',
    ADD COLUMN unique_value text;

-- `aggregation` says how `quantity` merges with the next batch; `value_time` is the event
-- time of the current value of a `latest` meter (NULL for the other aggregations).
ALTER TABLE tally.usage_daily
    ADD COLUMN aggregation text NOT NULL DEFAULT 'sum',
    ADD COLUMN value_time  timestamptz;
ALTER TABLE tally.usage_by_period
    ADD COLUMN aggregation text NOT NULL DEFAULT 'sum',
    ADD COLUMN value_time  timestamptz;

-- unique_count meters: the distinct values already counted in a day / a period. A value
-- adds 1 to the rollup only when its row here is new (same rule as the ledger keys).
CREATE TABLE tally.usage_daily_uniques (
    tenant_id    text NOT NULL,
    meter        text NOT NULL,
    day          date NOT NULL,
    unique_value text NOT NULL,
    PRIMARY KEY (tenant_id, meter, day, unique_value)
);
CREATE TABLE tally.usage_period_uniques (
    tenant_id    text        NOT NULL,
    meter        text        NOT NULL,
    period_start timestamptz NOT NULL,
    unique_value text        NOT NULL,
    PRIMARY KEY (tenant_id, meter, period_start, unique_value)
);

-- The plan catalog as published to the compacted `tally.plans` topic, so finance can join
-- usage to what each plan includes. `document` is the record as published (JSON).
CREATE TABLE tally.meters (
    meter            text PRIMARY KEY,
    aggregation      text  NOT NULL,
    unit             text  NOT NULL,
    unique_dimension text,
    lateness_seconds int   NOT NULL
);
CREATE TABLE tally.plans (
    plan_id           text    PRIMARY KEY,
    name              text    NOT NULL,
    currency          text    NOT NULL,
    monthly_fee_cents numeric NOT NULL,
    yearly_fee_cents  numeric,
    tier              int     NOT NULL,
    document          jsonb   NOT NULL
);
CREATE TABLE tally.plan_meters (
    plan_id    text    NOT NULL,
    meter      text    NOT NULL,
    included   numeric,          -- NULL: unlimited
    hard_limit numeric,          -- NULL: never blocked
    overage    jsonb,            -- the pricing of units above `included`; NULL: not billed
    PRIMARY KEY (plan_id, meter)
);

-- Records the projector could not apply (guarantee 3: reported, never silently dropped,
-- never retried forever). `item` is the position in a batch record, -1 for the whole
-- record. Keyed by position in the log, so a replay reports each problem once.
CREATE TABLE tally.projection_errors (
    topic            text        NOT NULL,
    partition        int         NOT NULL,
    "offset"         bigint      NOT NULL,
    item             int         NOT NULL,
    reason           text        NOT NULL,
    detail           text        NOT NULL,
    record_timestamp timestamptz NOT NULL,   -- the record's Kafka timestamp, not now()
    PRIMARY KEY (topic, partition, "offset", item)
);

-- Finance queries: one period (or day) across all tenants; invoices by period and status.
-- No new ledger index: every ledger index costs projection throughput, and a per-tenant
-- as-of audit is served by usage_events_tenant_time (001).
CREATE INDEX usage_by_period_period ON tally.usage_by_period (period_start, meter);
CREATE INDEX usage_daily_day ON tally.usage_daily (day, meter);
CREATE INDEX IF NOT EXISTS invoices_finance_period ON tally.invoices (period_start, status);
