"""The floor's pure rules: meters and aggregation kinds, periods and billing cycles, quota
decisions, trials and rating. Nothing here does I/O; every stage imports it."""
