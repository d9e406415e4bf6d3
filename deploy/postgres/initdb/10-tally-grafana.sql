-- Runs once, when the compose Postgres initialises its data directory (before
-- `tally db migrate`): the read-only finance role and Grafana's login in it. The
-- migration (runtime/sql/004_finance_access.sql) finds the role and grants it SELECT on
-- the finance-facing tables.
CREATE ROLE tally_finance NOLOGIN;
CREATE ROLE tally_grafana LOGIN PASSWORD 'tally_grafana' IN ROLE tally_finance;
