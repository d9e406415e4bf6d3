"""Projections: Postgres read models built from the Kafka log, exactly once."""
