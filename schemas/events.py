"""The wire contracts of DESIGN.md: usage and subscription events as CloudEvents 1.0.

Models are frozen: they cross process boundaries and are never mutated. Quantities are
Decimal (a JSON number is converted through its decimal text, never used as a float).
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

USAGE_TYPE = "tally.usage.v1"
SUBSCRIPTION_TYPES = (
    "tally.subscription.created.v1",
    "tally.subscription.plan_changed.v1",
    "tally.subscription.canceled.v1",
    "tally.subscription.renewed.v1",
)
SubscriptionType = Literal[
    "tally.subscription.created.v1",
    "tally.subscription.plan_changed.v1",
    "tally.subscription.canceled.v1",
    "tally.subscription.renewed.v1",
]

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
MAX_QUANTITY = Decimal("1e15")
# A tenant id becomes a Kafka key and part of compacted keys joined with "/".
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # use fullmatch

DimensionKey = Annotated[str, Field(max_length=64)]
DimensionValue = Annotated[str, Field(max_length=256)]

Frozen = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


def _check_tenant(value: str) -> str:
    if not TENANT_PATTERN.fullmatch(value):
        raise ValueError(
            "tenant id must be 1-128 characters of letters, digits and . _ : @ -, "
            "starting with a letter or digit"
        )
    return value


class UsageData(BaseModel):
    """`data` of a usage event: what was used, how much, and free-form dimensions."""

    model_config = Frozen

    meter: Annotated[str, Field(pattern=NAME_PATTERN)]
    quantity: Decimal
    dimensions: dict[DimensionKey, DimensionValue] = Field(default_factory=dict, max_length=32)

    @field_validator("quantity", mode="before")
    @classmethod
    def _no_float_arithmetic(cls, value: Any) -> Any:
        # A JSON number arrives as float: go through its shortest decimal text.
        if isinstance(value, float):
            return Decimal(repr(value))
        if isinstance(value, bool):
            raise ValueError("quantity must be a decimal string or number, not a boolean")
        return value

    @field_validator("quantity")
    @classmethod
    def _quantity_in_range(cls, value: Decimal) -> Decimal:
        if not value.is_finite():
            raise ValueError("quantity must be finite")
        if value < 0:
            raise ValueError("quantity must not be negative")
        if value > MAX_QUANTITY:
            raise ValueError(f"quantity must be at most {MAX_QUANTITY}")
        return value


class CloudEvent(BaseModel):
    """The CloudEvents 1.0 envelope fields Tally uses."""

    model_config = Frozen

    specversion: Literal["1.0"]
    id: Annotated[str, Field(min_length=1, max_length=128)]
    source: Annotated[str, Field(min_length=1, max_length=256)]
    subject: str
    time: AwareDatetime
    datacontenttype: Literal["application/json"] | None = "application/json"

    @field_validator("subject")
    @classmethod
    def _subject_is_tenant(cls, value: str) -> str:
        return _check_tenant(value)


class UsageEvent(CloudEvent):
    """`tally.usage.v1`: one unit of metered usage for the tenant in `subject`."""

    type: Literal["tally.usage.v1"]
    data: UsageData

    @property
    def tenant(self) -> str:
        return self.subject


class SubscriptionData(BaseModel):
    """`data` of a subscription event."""

    model_config = Frozen

    plan_id: Annotated[str, Field(pattern=NAME_PATTERN)]
    period_start: AwareDatetime
    period_end: AwareDatetime
    stripe_customer_id: str | None = None
    stripe_subscription_id: str | None = None
    cancel_at_period_end: bool | None = None
    trial_end: AwareDatetime | None = None

    @field_validator("period_end")
    @classmethod
    def _end_after_start(cls, value: datetime, info: Any) -> datetime:
        start = info.data.get("period_start")
        if start is not None and value <= start:
            raise ValueError("period_end must be after period_start")
        return value


class SubscriptionEvent(CloudEvent):
    """`tally.subscription.*.v1`: a tenant's subscription lifecycle."""

    type: SubscriptionType
    data: SubscriptionData

    @property
    def tenant(self) -> str:
        return self.subject


def check_tenant(value: str) -> str:
    """Return `value` if it is a valid tenant id, else raise ValueError."""
    return _check_tenant(value)
