"""What the API answers and accepts: frozen pydantic models, the OpenAPI document's schemas.

Quantities and money are decimals, written as JSON strings (never floats); money is in
cents of the plan's currency; times are RFC 3339.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from schemas.events import NAME_PATTERN, TENANT_PATTERN
from schemas.validation import MAX_QUANTITY

Frozen = ConfigDict(frozen=True)
# Built from a read model's row by its attributes (`Model.model_validate(row)`).
FromRow = ConfigDict(frozen=True, from_attributes=True)
Quantity = Annotated[Decimal, Field(gt=0, le=MAX_QUANTITY, max_digits=40, decimal_places=12)]
TenantId = Annotated[str, Field(pattern=f"^{TENANT_PATTERN.pattern}$")]
MeterName = Annotated[str, Field(pattern=NAME_PATTERN)]


class ErrorBody(BaseModel):
    model_config = Frozen
    error: str


class Meter(BaseModel):
    model_config = Frozen
    meter: str
    aggregation: str
    unit: str
    unique_dimension: str | None
    lateness_seconds: int


class MeterList(BaseModel):
    model_config = Frozen
    data: list[Meter]


class QueryRow(BaseModel):
    model_config = Frozen
    window_start: datetime
    window_end: datetime
    group: dict[str, str | None]
    value: Decimal
    events: int


class QueryResult(BaseModel):
    model_config = Frozen
    meter: str
    aggregation: str
    tenant: str | None
    window: str | None
    tz: str
    from_: datetime = Field(serialization_alias="from")
    to: datetime
    group_by: list[str]
    data: list[QueryRow]


class MeterUsage(BaseModel):
    """One meter in a cycle: usage against the plan's terms, and what it costs."""

    model_config = Frozen
    meter: str
    unit: str
    aggregation: str
    used: Decimal
    included: Decimal | None  # None: unlimited
    hard_limit: Decimal | None  # None: never blocked
    remaining: Decimal | None  # before the hard limit
    state: str  # ok, warning, exceeded, blocked (domain.quota)
    amount_cents: int | None  # the usage charge so far; None: not billed on the plan


class UsageCycle(BaseModel):
    """A cycle's usage and what it costs, in one currency. Money is never added across
    currencies: a past cycle whose plans are in several currencies (a plan change across
    currencies) is one entry per currency, as it is one invoice per currency."""

    model_config = Frozen
    tenant: str
    plan_id: str = Field(description="the plan in force last in the cycle among those "
                         "billed in `currency`")
    currency: str = Field(description="the currency of every amount of this entry")
    period_start: datetime
    period_end: datetime
    meters: list[MeterUsage]
    charges_cents: int | None  # usage charges of the cycle so far; None: not rated
    charges_basis: str  # how the charges were rated


class CurrentUsage(UsageCycle):
    """The current cycle so far. Its top-level amounts are in the currency of the plan in
    force now, the one the cycle's next invoice for that plan is in; a cycle with a plan
    change across currencies has one invoice per currency (docs/billing.md rule 10), so the
    amounts of its other currencies are entries of `other_currencies`, never added in."""

    # Why this shape: the one-currency cycle (nearly every one) reads as before, each
    # figure in `currency`; a client that reads only the top level never gets a sum of two
    # currencies; and each other currency is shown as `usage/history` shows that cycle's
    # entry in it once it has ended.
    other_currencies: list[UsageCycle] = Field(default_factory=list, description=(
        "empty unless the cycle changed plan across currencies: one entry per other "
        "currency of the cycle (by currency), each with the usage of the plan slices in "
        "that currency against the last of them and the amounts that currency's invoice "
        "for the cycle would carry were nothing more counted, as `usage/history` will "
        "show it; the top-level fields are the currency in force now, their meters' usage "
        "and quota states the whole cycle's against the plan in force (as the worker "
        "counts the period), their amounts only that currency's"))


class UsageHistory(BaseModel):
    model_config = Frozen
    tenant: str
    cycles: list[UsageCycle] = Field(description=(
        "newest first; one entry per cycle and currency (by currency within a cycle): a "
        "cycle with a plan change across currencies has one entry per currency, each with "
        "the usage of the plan slices in that currency and the amounts of that currency's "
        "invoice, as `GET /v1/tenants/{tenant}/invoices` lists one invoice per currency"))


class Subscription(BaseModel):
    model_config = Frozen
    tenant: str
    plan_id: str
    plan_name: str
    status: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    features: list[str]


class InvoiceLine(BaseModel):
    """A line of an invoice (`runtime.read_models.InvoiceLineView`)."""

    model_config = FromRow
    line_no: int
    kind: str | None  # domain.usage_charges.LineKind; None: a line before the billing model
    meter: str | None
    description: str
    quantity: Decimal
    unit_amount_cents: Decimal | None
    amount_cents: int
    currency: str | None


class Invoice(BaseModel):
    """An invoice Tally issued (`runtime.read_models.InvoiceView`, the invoice job's type,
    read by the same statement); `tenant` is its `tenant_id`."""

    model_config = FromRow
    invoice_id: str
    tenant: str = Field(validation_alias=AliasChoices("tenant", "tenant_id"))
    subscription_id: str | None
    kind: str | None  # domain.invoices.InvoiceKind; None: an invoice before the model
    issued_at: datetime | None
    due_at: datetime | None
    period_start: datetime
    period_end: datetime
    currency: str
    subtotal_cents: int
    total_cents: int
    status: str
    stripe_invoice_id: str | None
    hosted_invoice_url: str | None
    invoice_pdf: str | None
    lines: list[InvoiceLine] | None = None


class InvoiceList(BaseModel):
    model_config = Frozen
    data: list[Invoice]


class Feature(BaseModel):
    model_config = Frozen
    tenant: str
    feature: str
    enabled: bool
    plan_id: str


class EntitlementRequest(BaseModel):
    """A use of `quantity` of `meter` by `tenant`; `id` makes a consume idempotent."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    tenant: TenantId
    meter: MeterName
    quantity: Quantity = Decimal(1)
    id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")] | None = (
        None)
    dimensions: Annotated[dict[Annotated[str, Field(max_length=64, pattern=r"^[^\x00]*$")],
                               Annotated[str, Field(max_length=256, pattern=r"^[^\x00]*$")]],
                          Field(max_length=32)] = Field(default_factory=dict)


class EntitlementDecision(BaseModel):
    model_config = Frozen
    tenant: str
    meter: str
    quantity: Decimal
    allowed: bool
    reason: str
    used: Decimal
    limit: Decimal | None
    remaining: Decimal | None
    plan_id: str
    period_start: datetime
    period_end: datetime
    id: str | None
    duplicate: bool


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    tenant: TenantId
    plan_id: MeterName
    interval: Literal["month", "year"] = "month"
    success_url: Annotated[str, Field(pattern=r"^https?://[^\x00-\x20]+$", max_length=2048)]
    cancel_url: Annotated[str, Field(pattern=r"^https?://[^\x00-\x20]+$", max_length=2048)]


class PortalRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    tenant: TenantId
    return_url: Annotated[str, Field(pattern=r"^https?://[^\x00-\x20]+$", max_length=2048)]


class Session(BaseModel):
    model_config = Frozen
    id: str
    url: str


class AdminTenant(BaseModel):
    model_config = Frozen
    tenant: str
    plan_id: str | None
    status: str | None
    meters: int
    events: int
    worst_meter: str | None
    worst_used: Decimal | None
    worst_limit: Decimal | None
    usage_ratio: Decimal | None
    blocked_meters: int


class AdminTenantPage(BaseModel):
    model_config = Frozen
    total: int
    limit: int
    offset: int
    data: list[AdminTenant]


class TopConsumer(BaseModel):
    model_config = Frozen
    tenant: str
    value: Decimal
    events: int


class TopConsumers(BaseModel):
    model_config = Frozen
    meter: str
    from_: datetime = Field(serialization_alias="from")
    to: datetime
    data: list[TopConsumer]
