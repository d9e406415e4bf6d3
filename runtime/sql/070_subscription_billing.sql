-- Billing follows subscriptions (docs/billing.md): the subscription history, the ledger's
-- ingestion watermark, coupons, and invoices that name their subscription and kind.

-- Every `tally.subscription.*` event, as the projector read it (rule 1: history, not a
-- snapshot). `tally.subscriptions` stays the current view. Log order (partition, offset)
-- breaks ties between events of the same second; a tenant's events are all on one
-- partition (the record key is the tenant). `record_timestamp` is the record's Kafka
-- timestamp: when the event reached Tally, which tells a late event from a timely one.
-- Keyed by (tenant, event id): a redelivered event is stored once, the first time.
CREATE TABLE tally.subscription_events (
    tenant_id        text        NOT NULL,
    event_id         text        NOT NULL,
    type             text        NOT NULL,
    source           text        NOT NULL,
    event_time       timestamptz NOT NULL,
    data             jsonb       NOT NULL,
    record_timestamp timestamptz NOT NULL,
    topic            text        NOT NULL,
    partition        int         NOT NULL,
    "offset"         bigint      NOT NULL,
    item             int         NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);

-- What a tenant's history derives to (docs/billing.md, rule 1; `Subscription.segments`):
-- plan, interval, currency, status and validity of each stretch of each subscription.
-- Derived with the plan catalog, so written by the invoice job, which has it: replaced for
-- a tenant at every run that derives its history; a tenant whose history cannot be billed
-- keeps its last good segments (the journal says why).
CREATE TABLE tally.subscription_segments (
    tenant_id              text        NOT NULL,
    subscription_id        text        NOT NULL,
    plan_id                text        NOT NULL,
    billing_interval       text        NOT NULL,
    currency               text        NOT NULL,
    status                 text        NOT NULL,
    valid_from             timestamptz NOT NULL,
    valid_to               timestamptz,
    trial_end              timestamptz,
    stripe_customer_id     text,
    stripe_subscription_id text,
    PRIMARY KEY (subscription_id, valid_from)
);
CREATE INDEX subscription_segments_tenant ON tally.subscription_segments (tenant_id);

-- The ledger's ingestion watermark: per partition of `tally.usage.accepted`, the greatest
-- `ingested_at` projected, written in the same transaction as the rows and offsets. The
-- invoice job counts usage ingested up to its `now` only when the ledger has it all.
CREATE TABLE tally.ingestion_watermarks (
    projection       text        NOT NULL,
    topic            text        NOT NULL,
    partition        int         NOT NULL,
    ingested_through timestamptz NOT NULL,
    PRIMARY KEY (projection, topic, partition)
);

-- Rule 9: a plan's least usage charge per monthly cycle, as the catalog publishes it.
ALTER TABLE tally.plans ADD COLUMN minimum_cents numeric;

-- Coupons (`tally coupons create`) and their redemptions (`tally coupons apply`).
CREATE TABLE tally.coupons (
    code               text        PRIMARY KEY,
    percent_off        numeric,
    amount_off_cents   bigint,
    currency           text        NOT NULL,
    duration           text        NOT NULL CHECK (duration IN ('once', 'repeating', 'forever')),
    duration_in_months int,
    valid_from         timestamptz,
    valid_until        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    CHECK ((percent_off IS NULL) <> (amount_off_cents IS NULL))
);
CREATE TABLE tally.coupon_redemptions (
    tenant_id   text        NOT NULL,
    code        text        NOT NULL REFERENCES tally.coupons (code),
    redeemed_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, redeemed_at, code)
);

-- Invoices of the subscription model: a tenant has several invoices with the same period
-- start (the opening invoice and the first cycle's), so the old key goes; the invoice id
-- (subscription, date, kind, currency) is the key.
ALTER TABLE tally.invoices DROP CONSTRAINT IF EXISTS invoices_tenant_id_period_start_key;
ALTER TABLE tally.invoices
    ADD COLUMN subscription_id text,
    ADD COLUMN kind            text,
    ADD COLUMN issued_at       timestamptz,
    ADD COLUMN due_at          timestamptz,
    ADD COLUMN issued_by_run   timestamptz;  -- the `now` of the job run that issued it
CREATE INDEX invoices_tenant_issued ON tally.invoices (tenant_id, issued_at);
ALTER TABLE tally.invoice_lines
    ADD COLUMN kind     text,
    ADD COLUMN currency text,
    ALTER COLUMN unit_amount_cents DROP NOT NULL;  -- usage adjustments have no unit price

GRANT SELECT ON tally.subscription_events, tally.subscription_segments, tally.coupons,
    tally.coupon_redemptions TO tally_finance;
