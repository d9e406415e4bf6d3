"""Customers: create, retrieve, list and search (``/v1/customers``)."""

from __future__ import annotations

import re
import secrets
import string
from typing import Any, Final

from stripe_testkit.errors import JSON, ApiError, no_such
from stripe_testkit.params import (
    created_filter,
    get_dict,
    get_enum,
    get_int,
    get_metadata,
    get_str,
    page,
    reject,
)
from stripe_testkit.state import Call, State, new_id

__all__ = [
    "create_customer",
    "find_customer",
    "list_customers",
    "retrieve_customer",
    "search_customers",
]


def create_customer(state: State, call: Call) -> JSON:
    params = call.params
    reject(params, "source", "tax_id_data", "test_clock", "cash_balance")
    # Payment methods are not modelled beyond their ids: `payment_method` attaches one
    # (test tokens such as pm_card_visa), and only an attached one can be the default.
    attached = [pm] if (pm := get_str(params, "payment_method")) else []
    settings = get_dict(params, "invoice_settings") or {}
    default = get_str(settings, "default_payment_method")
    if default is not None and default not in attached:
        raise no_such("PaymentMethod", default, "invoice_settings[default_payment_method]")
    customer: JSON = {
        "id": new_id("cus"),
        "object": "customer",
        "created": call.now,
        "livemode": False,
        "address": get_dict(params, "address"),
        "balance": get_int(params, "balance") or 0,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": get_str(params, "description"),
        "discount": None,
        "email": get_str(params, "email"),
        "invoice_prefix": get_str(params, "invoice_prefix")
        or "".join(secrets.choice(string.ascii_uppercase) for _ in range(8)),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": default,
            "footer": None,
            "rendering_options": None,
        },
        "metadata": get_metadata(params),
        "name": get_str(params, "name"),
        "next_invoice_sequence": get_int(params, "next_invoice_sequence") or 1,
        "phone": get_str(params, "phone"),
        "preferred_locales": params.get("preferred_locales") or [],
        "shipping": get_dict(params, "shipping"),
        "tax_exempt": get_enum(params, "tax_exempt", ("none", "exempt", "reverse"), "none"),
        "test_clock": None,
    }
    state.customers[customer["id"]] = customer
    return customer


def retrieve_customer(state: State, call: Call) -> JSON:
    return find_customer(state, call.path["id"], param="id", status=404)


def list_customers(state: State, call: Call) -> JSON:
    email = get_str(call.params, "email")
    created = created_filter(call.params)
    found = [
        c
        for c in reversed(state.customers.values())
        if (email is None or c["email"] == email) and created(c)
    ]
    return page(found, call.params, "/v1/customers")


def search_customers(state: State, call: Call) -> JSON:
    query = get_str(call.params, "query", required=True)
    assert query is not None
    clauses = [_parse_search_clause(clause) for clause in query.split(" AND ")]
    found = [
        c
        for c in reversed(state.customers.values())
        if all(_search_value(c, path) == value for path, value in clauses)
    ]
    limit = get_int(call.params, "limit") or 10
    return {
        "object": "search_result",
        "data": found[:limit],
        "has_more": len(found) > limit,
        "next_page": None,
        "url": "/v1/customers/search",
    }


def find_customer(state: State, customer_id: str, *, param: str, status: int = 400) -> JSON:
    customer = state.customers.get(customer_id)
    if customer is None:
        raise no_such("customer", customer_id, param, status)
    return customer



_SEARCH_CLAUSE: Final = re.compile(r"\s*(\w+)(?:\['([^']+)'\])?\s*:\s*'([^']*)'\s*")


def _parse_search_clause(clause: str) -> tuple[tuple[str, ...], str]:
    match = _SEARCH_CLAUSE.fullmatch(clause)
    if match is None or match.group(1) not in {"email", "name", "phone", "metadata"}:
        raise ApiError(
            400,
            f"The Stripe double supports only `field:'value'` clauses on "
            f"email, name, phone and metadata['key'], joined by AND; got "
            f"{clause!r}.",
            param="query",
        )
    field_name, metadata_key, value = match.groups()
    path = (field_name, metadata_key) if field_name == "metadata" else (field_name,)
    return path, value


def _search_value(customer: JSON, path: tuple[str, ...]) -> Any:
    if path[0] == "metadata":
        return customer["metadata"].get(path[1])
    return customer[path[0]]
