"""The one settings object. Sources, strongest first: environment, `.tally/dev.env`, defaults.

`.tally/dev.env` is written by `tally dev up`, so `tally worker`, `tally project` and the jobs
find the embedded stack without flags. Setting `KAFKA_BOOTSTRAP_SERVERS` / `DATABASE_URL`
points everything at real Kafka / Postgres instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import TallyError
from schemas.plans import format_validation_error
from schemas.topics import DEFAULT_PREFIX, Topics
from schemas.validation import DEFAULT_MAX_FUTURE


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


KafkaCompression = Literal["none", "gzip", "snappy", "lz4", "zstd"]
COMPRESSIONS: tuple[KafkaCompression, ...] = get_args(KafkaCompression)


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
    # Codec of every record batch Tally writes. Snappy costs the writer less CPU than the
    # bytes it saves it sending: the worker's accepted events, most of its output, take a
    # third less CPU to send and the broker a fifth of the work to store
    # (bench/bench_compression.py). Every Kafka client reads snappy.
    kafka_compression: KafkaCompression = "snappy"
    # How far ahead of "now" a usage event's time may be (schemas/validation.py): now is
    # the wall clock for the SDK and the gateway, the record's ingestion time for the worker.
    max_future_seconds: int = Field(default=int(DEFAULT_MAX_FUTURE.total_seconds()), ge=0)
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None  # set to the Stripe double's address in dev/tests

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def max_future(self) -> timedelta:
        return timedelta(seconds=self.max_future_seconds)

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

    @staticmethod
    def env_name(field: str) -> str:
        """The environment variable of a field: the usual name, or TALLY_<FIELD>."""
        return field.upper() if field in _STANDARD_NAMES else f"TALLY_{field.upper()}"

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for a child process."""
        return {
            self.env_name(name): str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from the environment over `.tally/dev.env` over defaults."""
        env = dict(os.environ if environ is None else environ)
        merged = {**read_env_file(state_dir() / "dev.env"), **env}
        fields: dict[str, object] = {}
        for name in cls.model_fields:
            value = merged.get(cls.env_name(name), "")
            if value != "":
                fields[name] = value
        fields.update(overrides)
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            raise SettingsError(f"invalid settings: {format_validation_error(e)}") from e


_STANDARD_NAMES = {"kafka_bootstrap_servers", "database_url", "stripe_api_key", "stripe_api_base"}
