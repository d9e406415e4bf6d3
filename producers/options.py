"""How a producer batches, delivers and spools: `ProducerOptions`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from producers.spool import FsyncPolicy
from schemas.validation import check_text


class ProducerOptions(BaseModel):
    """How a producer batches, delivers and spools. Defaults suit a service in production."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Annotated[str, AfterValidator(check_text)] = Field(
        default="tally/sdk", min_length=1, max_length=256)
    """CloudEvents `source` of every event this producer builds, e.g. "svc/api-gateway".
    Checked here, once, by the shared text rules: the commonest `record()` call writes it
    into each event's bytes without checking it again (`encoding.fast_usage_json`)."""
    max_batch_events: int = Field(default=500, ge=1)
    max_batch_bytes: int = Field(default=900_000, ge=1024)
    """Bound on a record value; stays under the broker's 1 MiB default message size."""
    linger_ms: float = Field(default=20, ge=0)
    max_buffered_events: int = Field(default=100_000, ge=1)
    spool_dir: Path | None = None
    spool_fsync: FsyncPolicy = "interval"
    spool_fsync_interval_ms: int = Field(default=100, ge=1)
    spool_segment_bytes: int = Field(default=64 << 20, ge=1)
    spool_max_bytes: int = Field(default=4 << 30, ge=1)
    """Bound on the spool's disk use: once it holds this much, new events are refused with
    SpoolFullError until a replay makes room. Events already taken are always spooled, so
    the spool may pass the bound by what the buffer holds."""
    delivery_timeout_ms: int = Field(default=30_000, ge=100)
    """How long a record may wait for acknowledgement (retries included) before spooling."""
    connect_timeout_ms: int = Field(default=10_000, ge=100)
    retry_backoff_ms: int = Field(default=100, ge=1)
    reconnect_backoff_max_ms: int = Field(default=5_000, ge=1)
    kafka_options: dict[str, Any] = Field(default_factory=dict)
    """Extra aiokafka producer options, over those of `runtime.kafka.producer`."""
