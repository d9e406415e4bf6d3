-- The catalog-wide part of the plan catalog (the `_meters` record of tally.plans: default
-- plan and meters), as published. With tally.plans it is the catalog's Postgres copy, from
-- which `tally worker` restores the broker's catalog when tally.plans comes back empty
-- (runtime/plans.py restore_catalog).
CREATE TABLE tally.catalog_settings (
    key      text  PRIMARY KEY,
    document jsonb NOT NULL
);
GRANT SELECT ON tally.catalog_settings TO tally_finance;
