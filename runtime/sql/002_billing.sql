-- What the billing jobs write: invoices and the journal of every Stripe call.
CREATE TABLE tally.invoices (
    invoice_id        text        PRIMARY KEY,
    tenant_id         text        NOT NULL,
    period_start      timestamptz NOT NULL,
    period_end        timestamptz NOT NULL,
    currency          text        NOT NULL,
    subtotal_cents    bigint      NOT NULL,
    total_cents       bigint      NOT NULL,
    status            text        NOT NULL,
    stripe_invoice_id text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, period_start)
);

CREATE TABLE tally.invoice_lines (
    invoice_id        text    NOT NULL REFERENCES tally.invoices (invoice_id),
    line_no           int     NOT NULL,
    meter             text,
    description       text    NOT NULL,
    quantity          numeric NOT NULL,
    unit_amount_cents numeric NOT NULL,
    amount_cents      bigint  NOT NULL,
    PRIMARY KEY (invoice_id, line_no)
);

-- The outbox/journal: a row is written before a Stripe call and updated after it.
CREATE TABLE tally.stripe_pushes (
    idempotency_key  text        PRIMARY KEY,
    kind             text        NOT NULL,
    tenant_id        text        NOT NULL,
    request_summary  jsonb       NOT NULL,
    status           text        NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         int         NOT NULL DEFAULT 0,
    stripe_object_id text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_pushes_tenant ON tally.stripe_pushes (tenant_id, kind);
