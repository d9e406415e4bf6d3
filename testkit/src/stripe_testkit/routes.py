"""The dispatch table: each endpoint the double serves, its handler, and the operation of
Stripe's OpenAPI document that says which parameters it takes."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from stripe_testkit import customers, events, invoices, meters, prices, sessions
from stripe_testkit.errors import JSON
from stripe_testkit.openapi import Operation, operation
from stripe_testkit.state import Call, State

__all__ = ["ROUTES", "Handler", "Route", "find_route"]

Handler = Callable[[State, Call], JSON]


@dataclass(frozen=True)
class Route:
    """One endpoint: method and path template, its handler, its operation in the document."""

    method: str
    template: str
    handler: Handler
    body: Literal["form", "json"] = "form"
    auth: Literal["secret_key", "meter_event_session"] = "secret_key"
    operation: Operation = field(init=False)
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        found = operation(self.method, self.template.replace("{id}", "x"))
        if found is None:  # every route is in the document the double validates against
            raise LookupError(f"{self.method} {self.template} is not in stripe_openapi.json")
        object.__setattr__(self, "operation", found)
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    @property
    def key(self) -> str:
        """The name requests are counted under, e.g. ``POST /v1/customers``."""
        return f"{self.method} {self.template}"


ROUTES: Final[tuple[Route, ...]] = (
    Route("POST", "/v1/customers", customers.create_customer),
    Route("GET", "/v1/customers/search", customers.search_customers),
    Route("GET", "/v1/customers", customers.list_customers),
    Route("GET", "/v1/customers/{id}", customers.retrieve_customer),
    Route("POST", "/v1/billing/meters", meters.create_meter),
    Route("GET", "/v1/billing/meters", meters.list_meters),
    Route("GET", "/v1/billing/meters/{id}", meters.retrieve_meter),
    Route("GET", "/v1/billing/meters/{id}/event_summaries", meters.list_event_summaries),
    Route("POST", "/v1/billing/meter_events", meters.create_meter_event),
    Route("POST", "/v1/prices", prices.create_price),
    Route("GET", "/v1/prices", prices.list_prices),
    Route("GET", "/v1/prices/{id}", prices.retrieve_price),
    Route("POST", "/v1/invoiceitems", invoices.create_invoice_item),
    Route("GET", "/v1/invoiceitems", invoices.list_invoice_items),
    Route("GET", "/v1/invoiceitems/{id}", invoices.retrieve_invoice_item),
    Route("POST", "/v1/invoices", invoices.create_invoice),
    Route("GET", "/v1/invoices", invoices.list_invoices),
    Route("GET", "/v1/invoices/{id}", invoices.retrieve_invoice),
    Route("GET", "/v1/invoices/{id}/lines", invoices.list_invoice_lines),
    Route("POST", "/v1/invoices/{id}/finalize", invoices.finalize_invoice),
    Route("POST", "/v1/invoices/{id}/pay", invoices.pay_invoice),
    Route("POST", "/v1/invoices/{id}/void", invoices.void_invoice),
    Route("POST", "/v1/checkout/sessions", sessions.create_checkout_session),
    Route("POST", "/v1/billing_portal/sessions", sessions.create_portal_session),
    Route("POST", "/v2/billing/meter_event_session", meters.create_meter_event_session,
          body="json"),
    Route("POST", "/v2/billing/meter_event_stream", meters.create_meter_event_stream,
          body="json", auth="meter_event_session"),
    Route("GET", "/v2/core/events/{id}", events.retrieve_event),
)
"""The dispatch table: the first route whose method and path match handles a request."""


def find_route(method: str, path: str) -> tuple[Route | None, dict[str, str]]:
    """The first route matching ``method`` and ``path``, with the path's parameters."""
    for route in ROUTES:
        if route.method == method and (match := route.pattern.match(path)):
            return route, match.groupdict()
    return None, {}
