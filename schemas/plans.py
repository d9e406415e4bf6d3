"""The plan catalog: meters, plans, limits and overage prices.

Written by people as TOML (see `tally/catalog/plans.toml`), validated here, published to the
compacted `tally.plans` topic (one record per plan, plus one for the meter definitions),
and read by the worker (quotas) and the billing jobs (rating).

Money is in cents as Decimal so sub-cent unit prices (e.g. 0.1 cent per API call) are exact;
rounding to whole cents happens once per invoice line, in rating.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import CatalogError
from schemas.events import NAME_PATTERN

Frozen = ConfigDict(frozen=True, extra="forbid")
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
NonNegative = Annotated[Decimal, Field(ge=0)]

Aggregation = Literal["sum", "count", "max", "unique_count", "latest"]


class MeterSpec(BaseModel):
    """How a meter's events aggregate within a billing period."""

    model_config = Frozen

    aggregation: Aggregation = "sum"
    # For unique_count: the dimension whose distinct values are counted.
    unique_dimension: str | None = None
    unit: str = "unit"
    # Events up to this long after their period's end still count in that period.
    lateness_seconds: Annotated[int, Field(ge=0)] = 3600

    @model_validator(mode="after")
    def _unique_needs_dimension(self) -> MeterSpec:
        if (self.aggregation == "unique_count") != (self.unique_dimension is not None):
            raise ValueError("unique_dimension is required for unique_count and only for it")
        return self

    @property
    def lateness(self) -> timedelta:
        return timedelta(seconds=self.lateness_seconds)


class Tier(BaseModel):
    """One price tier; `up_to` None is the last, open-ended tier."""

    model_config = Frozen

    up_to: NonNegative | None = None
    unit_amount_cents: NonNegative = Decimal(0)
    flat_amount_cents: NonNegative = Decimal(0)


class PerUnit(BaseModel):
    model_config = Frozen
    model: Literal["per_unit"] = "per_unit"
    unit_amount_cents: NonNegative


class Package(BaseModel):
    model_config = Frozen
    model: Literal["package"] = "package"
    package_size: Annotated[Decimal, Field(gt=0)]
    package_amount_cents: NonNegative


class Graduated(BaseModel):
    model_config = Frozen
    model: Literal["graduated"] = "graduated"
    tiers: Annotated[list[Tier], Field(min_length=1)]


class Volume(BaseModel):
    model_config = Frozen
    model: Literal["volume"] = "volume"
    tiers: Annotated[list[Tier], Field(min_length=1)]


Pricing = Annotated[PerUnit | Package | Graduated | Volume, Field(discriminator="model")]


class PlanMeter(BaseModel):
    """A plan's terms for one meter."""

    model_config = Frozen

    included: NonNegative | None = None  # None: unlimited
    hard_limit: NonNegative | None = None  # None: never blocked
    soft_thresholds: list[Annotated[Decimal, Field(gt=0, le=1000)]] = Field(
        default_factory=lambda: [Decimal(80), Decimal(100)]
    )  # percent of `included`
    overage: Pricing | None = None  # None: overage is not billed

    @model_validator(mode="after")
    def _limits_consistent(self) -> PlanMeter:
        if (
            self.hard_limit is not None
            and self.included is not None
            and self.hard_limit < self.included
        ):
            raise ValueError("hard_limit must not be below included")
        return self


class Plan(BaseModel):
    """A plan: base fee, trial, features and per-meter terms."""

    model_config = Frozen

    name: str
    currency: Literal["usd", "eur", "gbp"] = "usd"
    monthly_fee_cents: NonNegative = Decimal(0)
    yearly_fee_cents: NonNegative | None = None
    trial_days: Annotated[int, Field(ge=0)] = 0
    # Least the usage charges of one monthly cycle come to; a "minimum" line tops them up
    # (docs/billing.md, rule 9). None: no minimum.
    minimum_cents: NonNegative | None = None
    tier: Annotated[int, Field(ge=0)] = 0  # upgrade order
    features: list[str] = Field(default_factory=list)
    meters: dict[Name, PlanMeter] = Field(default_factory=dict)


class Catalog(BaseModel):
    """The whole catalog: meters, plans and the plan of tenants with no subscription."""

    model_config = Frozen

    default_plan: Name
    meters: dict[Name, MeterSpec]
    plans: dict[Name, Plan]

    @model_validator(mode="after")
    def _references_exist(self) -> Catalog:
        problems = []
        if self.default_plan not in self.plans:
            problems.append(f"default_plan {self.default_plan!r} is not a plan")
        for plan_id, plan in self.plans.items():
            for meter in plan.meters:
                if meter not in self.meters:
                    problems.append(f"plan {plan_id!r} names unknown meter {meter!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def plan(self, plan_id: str | None) -> tuple[str, Plan]:
        """The plan with this id, or the default plan when it is unknown or None."""
        if plan_id is not None and plan_id in self.plans:
            return plan_id, self.plans[plan_id]
        return self.default_plan, self.plans[self.default_plan]


def format_validation_error(error: ValidationError) -> str:
    """Every problem of a pydantic error, one per line, with its location."""
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        lines.append(f"{where}: {item['msg']}")
    return "\n".join(lines)


def parse_catalog(document: dict[str, Any]) -> Catalog:
    """Validate a catalog document; raise CatalogError listing every problem."""
    try:
        return Catalog.model_validate(document)
    except ValidationError as e:
        raise CatalogError(format_validation_error(e)) from e


def load_catalog(path: Path) -> Catalog:
    """Read and validate a TOML catalog file."""
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise CatalogError(f"{path}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: invalid TOML: {e}") from e
    return parse_catalog(document)


def default_catalog_path() -> Path:
    return Path(__file__).resolve().parent.parent / "tally" / "catalog" / "plans.toml"
