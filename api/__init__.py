"""The usage and billing API (`tally api serve`): a stage beside the others.

It reads the Postgres read models (`api.queries`, `api.meter_query`), rates the current
cycle with the billing model of `domain/`, publishes allowed uses through the producer SDK
(`api.entitlements`), and asks Stripe for checkout and portal sessions
(`api.stripe_sessions`). Routes are in `api.routes_*`, assembled by `api.app.create_app`;
bearer tokens come from the tokens file (`api.auth`). `tally report` (`api.report`) shows
the same figures in a terminal.
"""
