"""The plan catalog in Stripe: a billing meter per catalog meter, prices per plan, customers.

`tally stripe sync-catalog` creates, per plan, a base-fee price per interval (month, and
year when the plan has a yearly fee) and a metered price per plan meter that bills
overage. Every object is created through the journal under a deterministic idempotency
key, so the job is safe to run twice and a crashed run is finished by the next one:

- meter:    `tally-meter-<meter>` (an active meter's event name is unique at Stripe);
- price:    `tally-price-<plan>-<item>-<digest>`, the digest a hash of the price's
  parameters. Stripe prices are immutable, so a changed catalog price is a new key and a
  new price; the lookup key (`tally_<plan>_<item>`) moves to it;
- customer: `tally-customer-<tenant>`.

A call unfinished for over a day (Stripe may have forgotten its key) is looked up before
it is sent again: the meter by its event name, the price by its lookup key and
`tally_price_key` metadata, the customer by its `tally_tenant_id` metadata.

What the prices are for: Stripe-side flows (Checkout, the customer portal, Stripe
subscriptions) reference them. Tally's invoices do not let Stripe recompute amounts:
rating (included units, tiers over the overage, minimums, coupons) has one implementation,
`rating.py`, and each invoice line goes to Stripe as an invoice item with its rated amount
and the price id in its metadata. So a tenant billed by `tally jobs invoice` must not also
hold a Stripe subscription on these prices. A metered price mirrors "included, then
overage" as a graduated price with a free first tier; volume tiers and packages with
included units, or fractional tier bounds, cannot be mirrored exactly, and their prices
say so in metadata (`tally_mirror=approximate`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import stripe
from stripe.params import PriceCreateParams, PriceCreateParamsTier

from billing_jobs import journal, metrics, stripe_api
from billing_jobs.errors import BillingError
from runtime.postgres import Connection, connect, migrate
from runtime.settings import Settings
from schemas.plans import Catalog, Graduated, Package, PerUnit, Plan, PlanMeter, Volume

Item = str  # "month" / "year" for base fees, the meter name for metered prices


class MissingStripeObject(BillingError):
    """A customer, meter or price Stripe does not have, and the job may not create."""


@dataclass(frozen=True)
class PriceSpec:
    """One catalog price as Stripe parameters (meter id filled in at sync time)."""

    plan_id: str
    item: Item
    kind: Literal["base_fee", "metered"]
    params: dict[str, Any]

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(self.params, sort_keys=True, default=str).encode())
        return f"tally-price-{self.plan_id}-{self.item}-{digest.hexdigest()[:12]}"


@dataclass
class SyncResult:
    meters: dict[str, str] = field(default_factory=dict)
    prices: dict[str, str] = field(default_factory=dict)  # journal key -> price id
    failed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"meters: {len(self.meters)}", f"prices: {len(self.prices)}"]
        return "\n".join(lines + [f"FAILED: {f}" for f in self.failed])


# --- pure: the catalog as Stripe price parameters ------------------------------------------


def price_specs(catalog: Catalog) -> list[PriceSpec]:
    """Every price the catalog needs, in a stable order."""
    specs: list[PriceSpec] = []
    for plan_id, plan in sorted(catalog.plans.items()):
        fees = [("month", plan.monthly_fee_cents), ("year", plan.yearly_fee_cents)]
        for interval, fee in fees:
            if fee is None:
                continue
            specs.append(PriceSpec(plan_id, interval, "base_fee", {
                "currency": plan.currency,
                "unit_amount_decimal": str(fee),
                "recurring": {"interval": interval, "usage_type": "licensed"},
                "product_data": {"name": f"Tally {plan.name} ({interval}ly fee)"},
                "lookup_key": f"tally_{plan_id}_{interval}",
                "metadata": {"tally_plan_id": plan_id, "tally_item": interval},
            }))
        for meter, terms in sorted(plan.meters.items()):
            if terms.overage is not None and terms.included is not None:
                specs.append(PriceSpec(plan_id, meter, "metered",
                                       _metered_params(plan_id, plan, meter, terms)))
    return specs


def _metered_params(plan_id: str, plan: Plan, meter: str, terms: PlanMeter) -> dict[str, Any]:
    assert terms.overage is not None and terms.included is not None
    included, pricing = terms.included, terms.overage
    exact = included == int(included)
    tiers: list[tuple[Decimal | None, Decimal, Decimal]] = []  # (up_to, unit, flat)
    mode = "graduated"
    if isinstance(pricing, PerUnit):
        tiers = [(None, pricing.unit_amount_cents, Decimal(0))]
    elif isinstance(pricing, Package):
        exact = exact and included == 0 and pricing.package_size == int(pricing.package_size)
        tiers = [(None, pricing.package_amount_cents / pricing.package_size, Decimal(0))]
    else:
        mode = "volume" if isinstance(pricing, Volume) else "graduated"
        exact = exact and (isinstance(pricing, Graduated) or included == 0)
        for t in pricing.tiers:
            bound = None if t.up_to is None else t.up_to + included
            exact = exact and (bound is None or bound == int(bound))
            tiers.append((bound, t.unit_amount_cents, t.flat_amount_cents))
    if included:
        tiers.insert(0, (included, Decimal(0), Decimal(0)))  # included units are free
    params: dict[str, Any] = {
        "currency": plan.currency,
        "recurring": {"interval": "month", "usage_type": "metered"},
        "product_data": {"name": f"Tally {plan.name}: {meter} overage"},
        "lookup_key": f"tally_{plan_id}_{meter}",
        "metadata": {"tally_plan_id": plan_id, "tally_item": meter,
                     "tally_mirror": "exact" if exact else "approximate"},
    }
    if isinstance(pricing, Package) and included == 0:
        params.update(unit_amount_decimal=str(pricing.package_amount_cents),
                      transform_quantity={"divide_by": int(pricing.package_size), "round": "up"})
    elif len(tiers) == 1:
        params["unit_amount_decimal"] = str(tiers[0][1])
    else:
        params.update(billing_scheme="tiered", tiers_mode=mode, tiers=[
            {"up_to": "inf" if up is None else str(int(up)), "unit_amount_decimal": str(unit),
             "flat_amount_decimal": str(flat)} for up, unit, flat in tiers])
    return params


def _typed(params: dict[str, Any], meter_id: str | None) -> PriceCreateParams:
    """The spec's parameters as the SDK's typed params (the meter id known only now)."""
    out: PriceCreateParams = {
        "currency": params["currency"],
        "product_data": {"name": params["product_data"]["name"]},
        "lookup_key": params["lookup_key"],
        "transfer_lookup_key": True,
        "metadata": params["metadata"],
        "recurring": {"interval": params["recurring"]["interval"],
                      "usage_type": params["recurring"]["usage_type"]},
    }
    if meter_id is not None:
        out["recurring"]["meter"] = meter_id
    if "unit_amount_decimal" in params:
        out["unit_amount_decimal"] = Decimal(params["unit_amount_decimal"])
    if "transform_quantity" in params:
        out["transform_quantity"] = {"divide_by": params["transform_quantity"]["divide_by"],
                                     "round": "up"}
    if "tiers" in params:
        out["billing_scheme"] = "tiered"
        out["tiers_mode"] = params["tiers_mode"]
        tiers: list[PriceCreateParamsTier] = []
        for t in params["tiers"]:
            up = t["up_to"]
            tiers.append(stripe_api.tier(None if up == "inf" else Decimal(up),
                                         Decimal(t["unit_amount_decimal"]),
                                         Decimal(t["flat_amount_decimal"])))
        out["tiers"] = tiers
    return out


# --- the journaled objects ----------------------------------------------------------------


def meter_key(meter: str) -> str:
    return f"tally-meter-{meter}"


def customer_key(tenant: str) -> str:
    return f"tally-customer-{tenant}"


def ensure_meter(conn: Connection, client: stripe.StripeClient, catalog: Catalog, meter: str,
                 policy: journal.RetryPolicy, *, create: bool = True) -> str:
    """The Stripe meter id of a catalog meter, created (once) if allowed."""
    key = meter_key(meter)
    known = journal.succeeded_object(conn, key)
    if known is not None:
        return known
    spec = catalog.meters.get(meter)
    summary = {"meter": meter}
    if spec is None or not create:
        why = ("is not in the plan catalog" if spec is None else
               "is unknown to Stripe and creation is off: run `tally stripe sync-catalog`")
        _missing(conn, key, "meter", "*", summary, f"meter {meter!r} {why}", "unknown_meter")
    assert spec is not None
    return journal.call(
        conn, key=key, kind="meter", tenant_id="*",
        summary={**summary, "aggregation": spec.aggregation},
        request=lambda k: stripe_api.create_meter(client, meter, spec.aggregation, k),
        lookup=lambda: stripe_api.find_meter(client, meter), policy=policy,
    )


def ensure_customer(conn: Connection, client: stripe.StripeClient, tenant: str,
                    known: str | None, policy: journal.RetryPolicy, *,
                    create: bool = True) -> str:
    """The tenant's Stripe customer: from its subscription, an earlier run, or created once."""
    if known:
        return known
    key = customer_key(tenant)
    done = journal.succeeded_object(conn, key)
    if done is not None:
        return done
    if not create:
        _missing(conn, key, "customer", tenant, {"tenant": tenant},
                 f"tenant {tenant!r} has no Stripe customer and auto-creation is off",
                 "no_customer")
    return journal.call(
        conn, key=key, kind="customer", tenant_id=tenant, summary={"tenant": tenant},
        request=lambda k: stripe_api.create_customer(client, tenant, k),
        lookup=lambda: stripe_api.find_customer(client, tenant), policy=policy,
    )


def _missing(conn: Connection, key: str, kind: str, tenant: str, summary: dict[str, Any],
             error: str, reason: str) -> None:
    journal.record_failure(conn, key=key, kind=kind, tenant_id=tenant, summary=summary,
                           error=error, reason=reason)
    raise MissingStripeObject(error)


# --- the job ------------------------------------------------------------------------------


def sync_catalog(settings: Settings, catalog: Catalog,
                 policy: journal.RetryPolicy | None = None) -> SyncResult:
    """`tally stripe sync-catalog`: every meter and price, each created at most once."""
    policy = policy or journal.RetryPolicy()
    client = stripe_api.client(settings, policy.timeout)
    database_url = settings.require_database()
    migrate(database_url)
    result = SyncResult()
    with connect(database_url, autocommit=True) as conn:
        for meter in sorted(catalog.meters):
            try:
                result.meters[meter] = ensure_meter(conn, client, catalog, meter, policy)
            except BillingError as e:
                result.failed.append(f"meter {meter}: {e}")
        for spec in price_specs(catalog):
            try:
                result.prices[spec.key()] = _ensure_price(conn, client, spec, result, policy)
            except BillingError as e:
                metrics.PUSH_ERRORS.labels("sync_catalog", type(e).__name__).inc()
                result.failed.append(f"price {spec.plan_id}/{spec.item}: {e}")
    return result


def _ensure_price(conn: Connection, client: stripe.StripeClient, spec: PriceSpec,
                  result: SyncResult, policy: journal.RetryPolicy) -> str:
    meter_id = None
    if spec.kind == "metered":
        meter_id = result.meters.get(spec.item)
        if meter_id is None:
            raise BillingError(f"meter {spec.item!r} has no Stripe meter")
    params = _typed(spec.params, meter_id)
    params["metadata"] = {**spec.params["metadata"], "tally_price_key": spec.key()}
    return journal.call(
        conn, key=spec.key(), kind="price", tenant_id="*",
        summary={"plan": spec.plan_id, "item": spec.item, **spec.params},
        request=lambda k: stripe_api.create_price(client, params, k),
        lookup=lambda: stripe_api.find_price(client, spec.params["lookup_key"], spec.key()),
        policy=policy,
    )
