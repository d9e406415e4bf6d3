"""The wire contracts of DESIGN.md: usage and subscription events as CloudEvents 1.0.

Models are frozen: they cross process boundaries and are never mutated. Quantities are
Decimal (a JSON number is converted through its decimal text, never used as a float).
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from schemas.validation import (
    QUANTITY_JSON_SCHEMA,
    check_text,
    check_time,
    quantity_of,
    time_text_only,
)

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
# A tenant id becomes a Kafka key and part of compacted keys joined with "/".
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # use fullmatch

# Free text and times, held to the rules of schemas/validation.py (what every stage can
# store: no NUL or unpaired surrogate; times from 1970 that convert to UTC).
Text = Annotated[str, AfterValidator(check_text)]
EventTime = Annotated[AwareDatetime, BeforeValidator(time_text_only),
                      AfterValidator(check_time)]
DimensionKey = Annotated[Text, Field(max_length=64)]
DimensionValue = Annotated[Text, Field(max_length=256)]

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
    quantity: Annotated[Decimal, WithJsonSchema(QUANTITY_JSON_SCHEMA)]
    dimensions: dict[DimensionKey, DimensionValue] = Field(default_factory=dict, max_length=32)

    @field_validator("quantity", mode="before")
    @classmethod
    def _acceptable_quantity(cls, value: Any) -> Decimal:
        # A JSON number arrives as float: read through its shortest decimal text, never
        # used as a float. Text must be in JSON's number grammar (schemas/validation.py).
        return quantity_of(value)


class CloudEvent(BaseModel):
    """The CloudEvents 1.0 envelope fields Tally uses."""

    model_config = Frozen

    specversion: Literal["1.0"]
    id: Annotated[Text, Field(min_length=1, max_length=128)]
    source: Annotated[Text, Field(min_length=1, max_length=256)]
    subject: str
    time: EventTime
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
    period_start: EventTime
    period_end: EventTime
    stripe_customer_id: Text | None = None
    stripe_subscription_id: Text | None = None
    cancel_at_period_end: bool | None = None
    trial_end: EventTime | None = None

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
