-- The rollups are updated in place by every projector transaction (one row per tenant,
-- meter and day or period it touched). With full pages (fillfactor 100) each update put the
-- new row version on another page and a new entry in every index, so an upsert walked an
-- ever longer chain of dead versions until vacuum came: 4,000+ buffers for 85 rows in a
-- small transaction. Room on each page lets the update stay on it (a HOT update: no index
-- entry, and the page prunes the dead versions itself): the projector's statement took
-- 0.78x the Postgres CPU in 100-event transactions (backend CPU time over 200 of them,
-- embedded Postgres 18, a ledger of 20,000 events). Pages written from now on keep the
-- room; older ones gain it as their rows move.
ALTER TABLE tally.usage_daily SET (fillfactor = 50);
ALTER TABLE tally.usage_by_period SET (fillfactor = 50);
