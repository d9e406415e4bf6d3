-- Signed Stripe events Tally cannot use: not shaped like a Stripe event, data of an
-- unexpected shape, or about no Tally tenant or plan. Redelivery cannot change them, so
-- the receiver acknowledges them (2xx: Stripe stops retrying) and keeps them here, with
-- the payload as received and the reason, for a person to look at. Their ids are also in
-- tally.stripe_webhook_events, so a redelivery is answered as a duplicate.
CREATE TABLE tally.stripe_webhook_unusable (
    event_id    text        PRIMARY KEY,  -- Stripe's id, or sha256:<hex> of a body without one
    type        text        NOT NULL,     -- "unknown" when the body is no event
    reason      text        NOT NULL,
    payload     text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
