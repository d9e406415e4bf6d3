-- The usage API's entitlement reservations (api/entitlements.py): every use that
-- `POST /v1/entitlements/consume` allowed, written before its usage event is published.
-- A tenant's usage of a meter in the current period is the ledger's (usage_by_period)
-- plus the reservations whose event the ledger does not hold yet (usage_event_keys), read
-- in one statement, under a per (tenant, meter) advisory lock: so concurrent consumers,
-- in one API process or several, never pass a hard limit. A row also makes consume
-- idempotent by event id: the same id again is answered as already recorded.
CREATE TABLE tally.entitlement_reservations (
    tenant_id    text        NOT NULL,
    event_id     text        NOT NULL,
    meter        text        NOT NULL,
    -- The event's time (it is published with this time): decides its period.
    event_time   timestamptz NOT NULL,
    quantity     numeric     NOT NULL CHECK (quantity > 0),  -- what it adds to the meter
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX entitlement_reservations_time
    ON tally.entitlement_reservations (tenant_id, meter, event_time);
