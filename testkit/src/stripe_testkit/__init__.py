"""Tally's test kit: a Stripe double, an HTTP server speaking the slice of Stripe's API
that Tally uses.

Tests drive the real ``stripe`` SDK against it by overriding the SDK's base addresses::

    with StripeDouble() as double:
        client = stripe.StripeClient(
            "sk_test_tally",
            base_addresses={"api": double.url, "meter_events": double.url},
            max_network_retries=0,
        )
        customer = client.v1.customers.create({"email": "ops@acme.test"})

Other processes (the demo) run it as ``python -m stripe_testkit --port 0``, which prints
the address it serves, and reach its state through its control endpoints
(``GET /_double/state``, ``POST /_double/reset``, ``POST /_double/faults``,
``POST /_double/clock`` ``{"advance": seconds}``, ``POST /_double/webhooks``
``{"url", "secret"}``).

It is a separate distribution (``testkit/``, ``tally-testkit``) that the developer
install (``make install``) adds; a runtime install of Tally does not ship it, and no
product module imports it.

One module per resource: ``customers``; ``meters`` (meters, meter events, their
summaries, the v2 session and stream); ``prices``; ``invoices`` (invoice items and
invoices); ``events`` (v2 thin events: meter error reports). Beside them: ``openapi``
(requests checked against Stripe's OpenAPI document, ``stripe_openapi.json``, sources in
``STRIPE_OPENAPI.md``), ``params`` (form parsing and reading parameters), ``idempotency``
(the replay store), ``faults`` (fault plans and injection), ``routes`` (the dispatch
table), ``server`` (HTTP, authentication, webhook delivery, :class:`StripeDouble`,
:class:`DoubleSnapshot`), ``proxy`` (a recording proxy in front of real Stripe, checking
every request against the same document) and ``__main__`` (the command line).

Behaviour that Tally's guarantees lean on — Stripe's, as documented, and no kinder:

1. Parameter checking. Every request is checked against Stripe's OpenAPI document for
   its operation, nested names included: an unknown parameter at any depth
   (``customer_mapping[typo]``) is refused the way Stripe refuses it, 400
   ``parameter_unknown``, "Received unknown parameter: customer_mapping[typo]"; so are
   missing required parameters, wrong types, values outside an enum, strings over their
   ``maxLength`` (a meter event ``identifier`` over 100 characters), and the limits Stripe
   documents outside the schema (metadata keys 40 characters, values 500, 50 keys;
   ``Idempotency-Key`` 255 characters). Every problem is also recorded
   (:attr:`DoubleSnapshot.invalid_requests`), so a test suite can assert that no request
   broke the document.
2. ``Stripe-Version``. A request must name a version of the major release the document
   describes (``endive``); the SDK pins one. Anything else is 400.
3. Idempotency keys. A POST whose ``Idempotency-Key`` was seen before with the same
   method, path and parameters replays the stored response with
   ``Idempotent-Replayed: true``; different parameters give 400 ``idempotency_error``.
   Like Stripe, only requests that reached the API method are stored — including their
   500s (the ``stored_500`` faults), which are replayed, so a retry under the same key
   cannot get past one; requests refused earlier (authentication, parameters, other
   injected faults) are not, so the key stays usable for a retry.
4. Memory. Keys and meter event identifiers are forgotten ``memory`` seconds (24 hours)
   after their first use, on the double's clock, which tests move with
   :meth:`StripeDouble.advance`. Stripe promises at least 24 hours: a test may raise
   ``memory`` to check that Tally does not rely on Stripe forgetting either.
5. Meter events. A repeated identifier within the memory window is refused
   synchronously, the way Stripe refuses it: 400 ``invalid_request_error``, "An event
   already exists with identifier <id>.", with ``Stripe-Should-Retry: false`` (Stripe's
   ``code`` for this case is not documented; the double sends
   ``resource_already_exists`` and ``param=identifier``); the event is not stored twice,
   so summaries never double count. Everything else (meter exists, customer mapping,
   whole-number value, timestamp within 35 days) is checked asynchronously, as at
   Stripe, on the v1 endpoint and the v2 stream alike: the request succeeds, the event is
   dropped (:attr:`DoubleSnapshot.rejected_meter_events`) and reported by a thin event,
   ``v1.billing.meter.error_report_triggered`` (or ``..no_meter_found``), delivered signed
   to the webhook URL and served by ``GET /v2/core/events/{id}``.
6. Injected faults (see :meth:`StripeDouble.faults`) are decided before a request has
   any effect: nothing is stored and the idempotency key is not consumed. The
   exceptions: ``timeout``, a lost response (the request takes effect and its key is
   stored, then the answer is held back ``FaultPlan.timeout`` seconds, past the client's
   timeout, so the client must retry with the same key to learn what happened), and the
   ``stored_500`` kinds (a 500 stored under the key, before or after the effect).
7. Prices (``POST /v1/prices``, with ``product_data`` for their product) are checked the
   way Stripe checks them: a tiered price needs ``tiers_mode`` and an open last tier, a
   metered price needs an existing meter, a ``lookup_key`` is unique among prices.
8. Invoices: finalizing gives an invoice its ``hosted_invoice_url`` and ``invoice_pdf``;
   a ``charge_automatically`` invoice whose customer has no default payment method fails
   to collect (it stays open, ``attempted``, with ``last_payment_error``); ``send_invoice``
   needs ``days_until_due``; an invoice item's ``period[end]`` is inclusive.

Deliberate differences from Stripe, all stricter or simpler: parameters the double does
not model (subscriptions, discounts, currency options) are refused with a message saying
so instead of being ignored; payments with a payment method always succeed; error
reports come one per request and meter (Stripe aggregates over a window) and sample every
rejected event.
"""

from __future__ import annotations

from stripe_testkit.faults import FAULT_KINDS, FaultPlan
from stripe_testkit.server import DoubleSnapshot, StripeDouble

__all__ = ["FAULT_KINDS", "DoubleSnapshot", "FaultPlan", "StripeDouble"]
