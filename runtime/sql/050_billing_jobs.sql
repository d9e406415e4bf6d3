-- The billing jobs' own state beside invoices and the journal (002_billing.sql).

-- What each invoice was rated on: the period's usage per meter at invoicing time.
-- Usage that reaches an invoiced period later is the difference to this snapshot (plus
-- what was already carried), billed on the tenant's next invoice: a finalized invoice is
-- never changed (DESIGN.md guarantee 4).
CREATE TABLE tally.invoice_usage (
    invoice_id text    NOT NULL REFERENCES tally.invoices (invoice_id),
    meter      text    NOT NULL,
    quantity   numeric NOT NULL,
    PRIMARY KEY (invoice_id, meter)
);

-- Late usage of an earlier, invoiced period carried onto a later invoice.
CREATE TABLE tally.invoice_adjustments (
    invoice_id        text    NOT NULL REFERENCES tally.invoices (invoice_id),
    source_invoice_id text    NOT NULL REFERENCES tally.invoices (invoice_id),
    meter             text    NOT NULL,
    quantity          numeric NOT NULL,
    amount_cents      bigint  NOT NULL,
    PRIMARY KEY (invoice_id, source_invoice_id, meter)
);

ALTER TABLE tally.invoices
    ADD COLUMN plan_id text,
    ADD COLUMN billing_interval text,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- Stripe webhook events already handled: a redelivery (same Stripe event id) is ignored.
CREATE TABLE tally.stripe_webhook_events (
    event_id    text        PRIMARY KEY,
    type        text        NOT NULL,
    outcome     text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
