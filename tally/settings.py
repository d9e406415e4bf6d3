"""The one settings object. Sources, strongest first: environment, `.tally/dev.env`, defaults.

`.tally/dev.env` is written by `tally dev up`, so `tally worker`, `tally project` and the jobs
find the embedded stack without flags. Setting `KAFKA_BOOTSTRAP_SERVERS` / `DATABASE_URL`
points everything at real Kafka / Postgres instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import TallyError
from schemas.topics import DEFAULT_PREFIX, Topics


class SettingsError(TallyError):
    """Settings are missing or invalid."""


def state_dir() -> Path:
    """Where the dev stack keeps its data and `dev.env` (TALLY_HOME, default ./.tally)."""
    return Path(os.environ.get("TALLY_HOME", ".tally")).resolve()


def read_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines; blank lines and # comments are skipped."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


class Settings(BaseModel):
    """Everything a Tally process needs to know about its surroundings."""

    model_config = ConfigDict(frozen=True)

    kafka_bootstrap_servers: str | None = None
    database_url: str | None = None
    topic_prefix: str = DEFAULT_PREFIX
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # Application id: the Faust app / consumer group name of the worker.
    worker_id: str = "tally-worker"
    # The embedded broker has no idempotent producer (InitProducerId fails).
    kafka_idempotence: bool = False
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None  # set to the Stripe double's address in dev/tests
    metrics_port: int = 0  # 0: pick a free port

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise SettingsError(
                "no Kafka: set KAFKA_BOOTSTRAP_SERVERS or start the dev stack with `tally dev up`"
            )
        return self.kafka_bootstrap_servers

    def require_database(self) -> str:
        if not self.database_url:
            raise SettingsError(
                "no Postgres: set DATABASE_URL or start the dev stack with `tally dev up`"
            )
        return self.database_url

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from the environment over `.tally/dev.env` over defaults."""
        env = dict(os.environ if environ is None else environ)
        merged = {**read_env_file(state_dir() / "dev.env"), **env}
        fields: dict[str, object] = {}
        for name in cls.model_fields:
            key = name.upper()
            if key in merged and merged[key] != "":
                fields[name] = merged[key]
        if "TALLY_TOPIC_PREFIX" in merged:
            fields["topic_prefix"] = merged["TALLY_TOPIC_PREFIX"]
        fields.update(overrides)
        return cls.model_validate(fields)
