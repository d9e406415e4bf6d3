"""Prices, each with its product (``/v1/prices``, with ``product_data``).

Checked the way Stripe checks them: a tiered price needs ``tiers_mode`` and an open
last tier, a metered price needs an existing meter, a ``lookup_key`` is unique among
prices.
"""

from __future__ import annotations

import re
from typing import Any

from stripe_testkit.errors import JSON, ApiError, missing, no_such
from stripe_testkit.params import (
    get_bool,
    get_decimal,
    get_dict,
    get_enum,
    get_int,
    get_metadata,
    get_str,
    page,
    reject,
)
from stripe_testkit.state import Call, State, new_id

__all__ = ["create_price", "list_prices", "retrieve_price"]


def create_price(state: State, call: Call) -> JSON:
    params = call.params
    reject(params, "currency_options", "custom_unit_amount")
    currency = (get_str(params, "currency", required=True) or "").lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise ApiError(400, f"Invalid currency: {currency}", param="currency")
    product_id = get_str(params, "product")
    product_data = get_dict(params, "product_data")
    if (product_id is None) == (product_data is None):
        raise ApiError(
            400, "You must specify exactly one of product or product_data.", param="product"
        )
    if product_id is not None:
        if product_id not in state.products:
            raise no_such("product", product_id, "product")
    else:
        assert product_data is not None
        product_id = get_str(product_data, "id") or new_id("prod")
        if product_id in state.products:
            raise ApiError(
                400,
                f"Product already exists: {product_id}",
                code="resource_already_exists",
                param="product_data[id]",
            )
        state.products[product_id] = {
            "id": product_id,
            "object": "product",
            "name": get_str(product_data, "name", required=True),
            "metadata": get_metadata(product_data),
            "created": call.now,
        }
    scheme = get_enum(params, "billing_scheme", ("per_unit", "tiered"), "per_unit")
    unit_amount = get_int(params, "unit_amount")
    unit_amount_decimal = get_decimal(params, "unit_amount_decimal")
    tiers = params.get("tiers")
    transform = get_dict(params, "transform_quantity")
    if scheme == "per_unit":
        if tiers is not None:
            raise ApiError(400, "tiers require billing_scheme=tiered.", param="tiers")
        if (unit_amount is None) == (unit_amount_decimal is None):
            raise ApiError(
                400,
                "Exactly one of unit_amount and unit_amount_decimal is required.",
                param="unit_amount",
            )
    else:
        tiers = _tiers(tiers)
        if not get_enum(params, "tiers_mode", ("graduated", "volume"), ""):
            raise missing("tiers_mode")
        if transform is not None:
            raise ApiError(
                400, "transform_quantity cannot be combined with tiers.",
                param="transform_quantity",
            )
    recurring = get_dict(params, "recurring")
    if recurring is not None:
        if not get_enum(recurring, "interval", ("day", "week", "month", "year"), ""):
            raise missing("recurring[interval]")
        usage_type = get_enum(recurring, "usage_type", ("licensed", "metered"), "licensed")
        meter_id = get_str(recurring, "meter")
        if usage_type == "metered" and meter_id is None:
            raise missing("recurring[meter]")
        if meter_id is not None and meter_id not in state.meters:
            raise no_such("billing meter", meter_id, "recurring[meter]")
        recurring = {
            "interval": recurring["interval"],
            "interval_count": get_int(recurring, "interval_count") or 1,
            "meter": meter_id,
            "usage_type": usage_type,
        }
    lookup_key = get_str(params, "lookup_key")
    if lookup_key is not None:
        holder = next((p for p in state.prices.values() if p["lookup_key"] == lookup_key), None)
        if holder is not None and not get_bool(params, "transfer_lookup_key"):
            raise ApiError(
                400,
                f"A price (`{holder['id']}`) already uses that lookup key.",
                code="lookup_key_exists",  # not documented; the double's name for it
                param="lookup_key",
            )
        if holder is not None:
            holder["lookup_key"] = None
    price: JSON = {
        "id": new_id("price"),
        "object": "price",
        "active": get_bool(params, "active") is not False,
        "billing_scheme": scheme,
        "created": call.now,
        "currency": currency,
        "livemode": False,
        "lookup_key": lookup_key,
        "metadata": get_metadata(params),
        "nickname": get_str(params, "nickname"),
        "product": product_id,
        "recurring": recurring,
        "tax_behavior": get_str(params, "tax_behavior") or "unspecified",
        "tiers": tiers,
        "tiers_mode": get_str(params, "tiers_mode"),
        "transform_quantity": transform,
        "type": "recurring" if recurring is not None else "one_time",
        "unit_amount": unit_amount,
        "unit_amount_decimal": None
        if scheme == "tiered"
        else str(unit_amount_decimal if unit_amount_decimal is not None else unit_amount),
    }
    state.prices[price["id"]] = price
    return price


def _tiers(raw: Any) -> list[JSON]:
    """Stripe's tier rules: at least one, increasing `up_to`, the last one `inf`."""
    if not isinstance(raw, list) or not raw:
        raise missing("tiers")
    tiers: list[JSON] = []
    previous = 0
    for index, tier in enumerate(raw):
        if not isinstance(tier, dict):
            raise ApiError(400, f"Invalid object: tiers[{index}]", param="tiers")
        last = index == len(raw) - 1
        bound = tier.get("up_to")
        if bound == "inf":
            if not last:
                raise ApiError(400, "Only the last tier may be `inf`.", param="tiers")
            up_to = None
        else:
            up_to = get_int(tier, "up_to", required=True)
            assert up_to is not None
            if last:
                raise ApiError(400, "The last tier must have up_to=inf.", param="tiers")
            if up_to <= previous:
                raise ApiError(400, "Tier up_to values must increase.", param="tiers")
            previous = up_to
        unit = get_decimal(tier, "unit_amount_decimal")
        flat = get_decimal(tier, "flat_amount_decimal")
        tiers.append(
            {
                "up_to": up_to,
                "unit_amount": get_int(tier, "unit_amount"),
                "unit_amount_decimal": None if unit is None else str(unit),
                "flat_amount": get_int(tier, "flat_amount"),
                "flat_amount_decimal": None if flat is None else str(flat),
            }
        )
    return tiers


def retrieve_price(state: State, call: Call) -> JSON:
    price = state.prices.get(call.path["id"])
    if price is None:
        raise no_such("price", call.path["id"], "id", 404)
    return price


def list_prices(state: State, call: Call) -> JSON:
    lookup_keys = call.params.get("lookup_keys")
    wanted = set(lookup_keys) if isinstance(lookup_keys, list) else None
    found = [
        p
        for p in reversed(state.prices.values())
        if wanted is None or p["lookup_key"] in wanted
    ]
    return page(found, call.params, "/v1/prices")

