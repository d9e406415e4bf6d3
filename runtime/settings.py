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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
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
    # How often the worker checks that the logs it reads are still those it has read (a
    # broker that came back empty, a topic recreated: streams/log_watch.py). A check costs
    # the worker's core about 60 ms (4 partitions of each of 4 topics, 500 KiB frames).
    worker_log_check_seconds: float = Field(default=5.0, gt=0)
    # The embedded broker has no idempotent producer (InitProducerId fails).
    kafka_idempotence: bool = False
    # Codec of every record batch Tally writes. Snappy costs the writer less CPU than the
    # bytes it saves it sending: the worker's accepted events, most of its output, take a
    # third less CPU to send and the broker a fifth of the work to store
    # (bench/bench_compression.py). Every Kafka client reads snappy.
    kafka_compression: KafkaCompression = "snappy"
    # How every Tally client (producers, consumers, admin, the Faust worker) authenticates
    # to a production cluster: TLS with an optional CA bundle and client certificate, and
    # SASL (PLAIN or SCRAM) over it. runtime/kafka.py turns these into client options.
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: KafkaSaslMechanism = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None  # CA bundle; the system's trust store when unset
    kafka_ssl_certfile: str | None = None  # client certificate (mutual TLS)
    kafka_ssl_keyfile: str | None = None
    # How far ahead of "now" a usage event's time may be (schemas/validation.py): now is
    # the wall clock for the SDK and the gateway, the record's ingestion time for the worker.
    max_future_seconds: int = Field(default=int(DEFAULT_MAX_FUTURE.total_seconds()), ge=0)
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None  # set to the Stripe double's address in dev/tests
    # The tokens file every server with an HTTP surface reads (runtime/credentials.py): each
    # bearer token with its service, tenants and scopes.
    tokens_file: Path | None = None
    # Where each server listens. Loopback by default: a server is reachable from elsewhere
    # only when its setting says so (in a container, 0.0.0.0 behind the pod's network, for
    # Prometheus, the probes and the clients).
    gateway_host: str = "127.0.0.1"  # `tally ingest serve`
    worker_web_host: str = "127.0.0.1"  # `tally worker`: /quota, /healthz, /metrics
    notifier_web_host: str = "127.0.0.1"  # `tally notify serve`: /healthz, /metrics
    projector_metrics_host: str = "127.0.0.1"  # `tally project`: /metrics
    scheduler_metrics_host: str = "127.0.0.1"  # `tally jobs schedule`: /metrics
    webhooks_host: str = "127.0.0.1"  # `tally stripe webhooks serve`
    api_host: str = "127.0.0.1"  # `tally api serve`
    # Postgres connections one API process holds at most (reads and entitlement decisions).
    api_pool_size: int = Field(default=10, ge=1, le=1000)
    # The entitlement reservation sweeper (api/sweeper.py): how often it runs, and how long
    # a reservation is left alone after its decision (or its last retry) before the sweeper
    # asks the log whether its event was published. Longer than a publish can take.
    api_sweep_interval_seconds: float = Field(default=60, gt=0, le=86400)
    api_reservation_grace_seconds: float = Field(default=300, ge=0, le=86400 * 30)
    # The mail server the notifier sends customer alerts through (streams/channels/mail.py).
    # No host: e-mail channels cannot be delivered (each goes to the dead letters).
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_user: str | None = None  # log in when set (only after STARTTLS, unless turned off)
    smtp_password: str | None = None
    smtp_from: str = "Tally <tally@localhost>"  # the From header and envelope sender
    smtp_starttls: bool = True  # upgrade the connection with STARTTLS before anything else
    # Invoices of customers without a default payment method are sent (`send_invoice`) and
    # due this many days after finalization; with one, Stripe charges it.
    stripe_days_until_due: int = Field(default=30, ge=0, le=730)

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL_") and not (
                self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"TALLY_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} "
                             "needs TALLY_KAFKA_SASL_USERNAME and TALLY_KAFKA_SASL_PASSWORD")
        return self

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
