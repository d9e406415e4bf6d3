-- Stripe's memory is finite (issue 16): idempotency keys and meter event identifiers are
-- kept at least 24 hours, a key may hold a stored error, and a meter event may be
-- rejected after it was accepted. So one journaled call may need a NEW key, after a
-- lookup of what Stripe already has (billing_jobs/journal.py says when).

ALTER TABLE tally.stripe_pushes
    -- What the row is about, the same for every key a call is sent under: the call's
    -- readable first key, or for meter events their (tenant, meter, period) series.
    ADD COLUMN logical_key    text,
    -- 0 for a call's first key, n for the nth new key it was sent under.
    ADD COLUMN generation     int         NOT NULL DEFAULT 0,
    -- On the job's clock (jobs may run "as of" another time): when the key was first
    -- sent (Stripe's 24 hours count from here) and last sent.
    ADD COLUMN first_tried_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_tried_at  timestamptz NOT NULL DEFAULT now(),
    -- The key must not be sent again: Stripe holds an error under it, or rejected the
    -- meter event it carried after accepting it.
    ADD COLUMN key_spent      boolean     NOT NULL DEFAULT false,
    -- Status 'replaced': the key a lookup found missing at Stripe was replaced by this one.
    ADD COLUMN replaced_by    text;

UPDATE tally.stripe_pushes SET
    logical_key = CASE WHEN kind = 'meter_event'
                       THEN regexp_replace(idempotency_key, ':[^:]*$', '')
                       ELSE idempotency_key END,
    first_tried_at = created_at,
    last_tried_at = updated_at;

ALTER TABLE tally.stripe_pushes DROP CONSTRAINT stripe_pushes_status_check;
ALTER TABLE tally.stripe_pushes ADD CONSTRAINT stripe_pushes_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'replaced'));
CREATE INDEX stripe_pushes_logical ON tally.stripe_pushes (logical_key, generation);

-- What Stripe says about each invoice Tally sent: how it is collected (decided once, so a
-- retried create sends the same parameters) and the customer's copy (from the create and
-- finalize responses and from invoice.finalized / invoice.paid webhooks).
ALTER TABLE tally.invoices
    ADD COLUMN collection_method  text,
    ADD COLUMN hosted_invoice_url text,
    ADD COLUMN invoice_pdf        text;
