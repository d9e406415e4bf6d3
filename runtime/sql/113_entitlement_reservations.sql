-- Entitlement consumes of every meter kind (api/entitlements.py, domain/meters.py): a
-- unique_count meter's use is new or not by its unique value, so a reservation keeps the
-- value of the meter's unique dimension (NULL for the other kinds). The quantity of a
-- reservation is now the use's quantity for every kind (a count meter's was 1: its kind
-- now counts reservations, not their quantities, so the rows already there still agree).
ALTER TABLE tally.entitlement_reservations ADD COLUMN unique_value text;

-- When the reservation was last decided or retried (consume again with the same id): the
-- sweeper (api/sweeper.py) leaves a reservation alone for a grace time after it, so it
-- never judges a publish still in progress.
ALTER TABLE tally.entitlement_reservations
    ADD COLUMN touched_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX entitlement_reservations_touched
    ON tally.entitlement_reservations (touched_at);
