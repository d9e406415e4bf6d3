"""The dispatch table: each endpoint the double serves, its parameters and handler."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import stripe.params as v1_params
import stripe.params.billing as billing_params
import stripe.params.v2.billing as v2_billing_params

from stripe_testkit import customers, invoices, meters, prices
from stripe_testkit.errors import JSON
from stripe_testkit.params import ParamSpec
from stripe_testkit.state import Call, State

__all__ = ["ROUTES", "Handler", "Route", "find_route"]

Handler = Callable[[State, Call], JSON]


@dataclass(frozen=True)
class Route:
    """One endpoint: method and path template, its parameter spec, its handler."""

    method: str
    template: str
    params_type: Any
    handler: Handler
    body: Literal["form", "json"] = "form"
    auth: Literal["secret_key", "meter_event_session"] = "secret_key"
    spec: ParamSpec = field(init=False)
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        object.__setattr__(self, "spec", ParamSpec.of(self.params_type))
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    @property
    def key(self) -> str:
        """The name requests are counted under, e.g. ``POST /v1/customers``."""
        return f"{self.method} {self.template}"


ROUTES: Final[tuple[Route, ...]] = (
    Route("POST", "/v1/customers", v1_params.CustomerCreateParams, customers.create_customer),
    Route(
        "GET", "/v1/customers/search", v1_params.CustomerSearchParams, customers.search_customers
    ),
    Route("GET", "/v1/customers", v1_params.CustomerListParams, customers.list_customers),
    Route(
        "GET", "/v1/customers/{id}", v1_params.CustomerRetrieveParams, customers.retrieve_customer
    ),
    Route("POST", "/v1/billing/meters", billing_params.MeterCreateParams, meters.create_meter),
    Route("GET", "/v1/billing/meters", billing_params.MeterListParams, meters.list_meters),
    Route(
        "GET", "/v1/billing/meters/{id}", billing_params.MeterRetrieveParams, meters.retrieve_meter
    ),
    Route(
        "GET",
        "/v1/billing/meters/{id}/event_summaries",
        billing_params.MeterEventSummaryListParams,
        meters.list_event_summaries,
    ),
    Route(
        "POST",
        "/v1/billing/meter_events",
        billing_params.MeterEventCreateParams,
        meters.create_meter_event,
    ),
    Route("POST", "/v1/prices", v1_params.PriceCreateParams, prices.create_price),
    Route("GET", "/v1/prices", v1_params.PriceListParams, prices.list_prices),
    Route("GET", "/v1/prices/{id}", v1_params.PriceRetrieveParams, prices.retrieve_price),
    Route(
        "POST", "/v1/invoiceitems", v1_params.InvoiceItemCreateParams, invoices.create_invoice_item
    ),
    Route("GET", "/v1/invoiceitems", v1_params.InvoiceItemListParams, invoices.list_invoice_items),
    Route(
        "GET",
        "/v1/invoiceitems/{id}",
        v1_params.InvoiceItemRetrieveParams,
        invoices.retrieve_invoice_item,
    ),
    Route("POST", "/v1/invoices", v1_params.InvoiceCreateParams, invoices.create_invoice),
    Route("GET", "/v1/invoices", v1_params.InvoiceListParams, invoices.list_invoices),
    Route("GET", "/v1/invoices/{id}", v1_params.InvoiceRetrieveParams, invoices.retrieve_invoice),
    Route(
        "GET",
        "/v1/invoices/{id}/lines",
        v1_params.InvoiceLineItemListParams,
        invoices.list_invoice_lines,
    ),
    Route(
        "POST",
        "/v1/invoices/{id}/finalize",
        v1_params.InvoiceFinalizeInvoiceParams,
        invoices.finalize_invoice,
    ),
    Route("POST", "/v1/invoices/{id}/pay", v1_params.InvoicePayParams, invoices.pay_invoice),
    Route(
        "POST", "/v1/invoices/{id}/void", v1_params.InvoiceVoidInvoiceParams, invoices.void_invoice
    ),
    Route(
        "POST",
        "/v2/billing/meter_event_session",
        v2_billing_params.MeterEventSessionCreateParams,
        meters.create_meter_event_session,
        body="json",
    ),
    Route(
        "POST",
        "/v2/billing/meter_event_stream",
        v2_billing_params.MeterEventStreamCreateParams,
        meters.create_meter_event_stream,
        body="json",
        auth="meter_event_session",
    ),
)
"""The dispatch table: the first route whose method and path match handles a request."""


def find_route(method: str, path: str) -> tuple[Route | None, dict[str, str]]:
    """The first route matching ``method`` and ``path``, with the path's parameters."""
    for route in ROUTES:
        if route.method == method and (match := route.pattern.match(path)):
            return route, match.groupdict()
    return None, {}
