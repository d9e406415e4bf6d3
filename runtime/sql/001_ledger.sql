-- The ledger and its rollups (DESIGN.md, Postgres read models).
CREATE SCHEMA IF NOT EXISTS tally;

-- Uniqueness of (tenant_id, event_id) across all months. A unique index on the
-- partitioned ledger would have to include event_time (Postgres requires the partition
-- key in it), which would let the same id with another time in twice.
CREATE TABLE tally.usage_event_keys (
    tenant_id text NOT NULL,
    event_id  text NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);

CREATE TABLE tally.usage_events (
    event_id     text        NOT NULL,
    tenant_id    text        NOT NULL,
    meter        text        NOT NULL,
    quantity     numeric     NOT NULL CHECK (quantity >= 0),
    event_time   timestamptz NOT NULL,
    ingested_at  timestamptz NOT NULL,
    source       text        NOT NULL,
    dimensions   jsonb       NOT NULL DEFAULT '{}',
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    plan_id      text        NOT NULL,
    late         boolean     NOT NULL DEFAULT false,
    adjustment   boolean     NOT NULL DEFAULT false
) PARTITION BY RANGE (event_time);
CREATE INDEX usage_events_tenant_time ON tally.usage_events (tenant_id, meter, event_time);
CREATE INDEX usage_events_tenant_period ON tally.usage_events (tenant_id, period_start);

CREATE TABLE tally.usage_daily (
    tenant_id   text    NOT NULL,
    meter       text    NOT NULL,
    day         date    NOT NULL,
    quantity    numeric NOT NULL,
    event_count bigint  NOT NULL,
    PRIMARY KEY (tenant_id, meter, day)
);

CREATE TABLE tally.usage_by_period (
    tenant_id    text        NOT NULL,
    meter        text        NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    plan_id      text        NOT NULL,
    quantity     numeric     NOT NULL,
    event_count  bigint      NOT NULL,
    PRIMARY KEY (tenant_id, meter, period_start)
);

CREATE TABLE tally.subscriptions (
    tenant_id              text        PRIMARY KEY,
    plan_id                text        NOT NULL,
    status                 text        NOT NULL,
    current_period_start   timestamptz NOT NULL,
    current_period_end     timestamptz NOT NULL,
    stripe_customer_id     text,
    stripe_subscription_id text,
    updated_at             timestamptz NOT NULL
);

CREATE TABLE tally.quota_state (
    tenant_id    text        NOT NULL,
    meter        text        NOT NULL,
    period_start timestamptz NOT NULL,
    used         numeric     NOT NULL,
    "limit"      numeric,
    state        text        NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, meter)
);

-- Consumer offsets of each projection, written in the same transaction as its rows.
CREATE TABLE tally.projection_offsets (
    projection  text   NOT NULL,
    topic       text   NOT NULL,
    partition   int    NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (projection, topic, partition)
);
