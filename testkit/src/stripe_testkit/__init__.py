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
(``GET /_double/state``, ``POST /_double/reset``, ``POST /_double/faults``).

It is a separate distribution (``testkit/``, ``tally-testkit``) that the developer
install (``make install``) adds; a runtime install of Tally does not ship it, and no
product module imports it.

One module per resource: ``customers``; ``meters`` (meters, meter events, their
summaries, the v2 session and stream); ``prices``; ``invoices`` (invoice items and
invoices). Beside them: ``params`` (form parsing and each endpoint's accepted
parameters), ``idempotency`` (the replay store), ``faults`` (fault plans and
injection), ``routes`` (the dispatch table), ``server`` (HTTP, authentication,
:class:`StripeDouble`, :class:`DoubleSnapshot`) and ``__main__`` (the command line).

Behaviour that Tally's guarantees lean on, and where the double provides it:

1. Parameter checking. Each endpoint accepts exactly the top-level parameters of the
   SDK's generated ``*Params`` TypedDict for that call (read from its annotations, not
   typed by hand), so a misspelt parameter in a Tally call fails a test the way it
   would fail against Stripe: 400 ``parameter_unknown``, "Received unknown parameter".
2. Idempotency keys. A POST whose ``Idempotency-Key`` was seen before with the same
   method, path and parameters replays the stored response with
   ``Idempotent-Replayed: true``; different parameters give 400 ``idempotency_error``.
   Like Stripe, only requests that reached the API method are stored (their 200s and
   their business 400s); requests refused earlier (authentication, unknown or missing
   parameters, injected faults) are not, so the key stays usable for a retry.
3. Meter event identifiers are unique for the life of the double (Stripe: a rolling
   window of at least 24 hours). A repeat is refused the way Stripe refuses it: 400
   ``invalid_request_error``, "An event already exists with identifier <id>.", with
   ``Stripe-Should-Retry: false``. Stripe's ``code`` for this case is not documented;
   the double sends ``resource_already_exists`` and ``param=identifier``. The event is
   not stored twice, so summaries never double count.
4. Injected faults (see :meth:`StripeDouble.faults`) are decided before a request has
   any effect: nothing is stored and the idempotency key is not consumed. The one
   exception is ``timeout``, a lost response: the request takes effect (and its key is
   stored), then the answer is held back ``FaultPlan.timeout`` seconds, past the client's
   timeout, so the client must retry with the same key to learn what happened.
5. Prices (``POST /v1/prices``, with ``product_data`` for their product) are checked the
   way Stripe checks them: a tiered price needs ``tiers_mode`` and an open last tier, a
   metered price needs an existing meter, a ``lookup_key`` is unique among prices.

Deliberate differences from Stripe, all stricter: meter event checks that Stripe runs
asynchronously (meter exists, customer mapping, whole-number value) run synchronously
and refuse the request with the error-report code Stripe would use; parameters the
double does not model (subscriptions, discounts, currency options) are refused with a message
saying so instead of being ignored; payments always succeed. On the v2 meter event
stream Stripe validates asynchronously, so there the double accepts the request and
drops invalid events into :attr:`DoubleSnapshot.dropped_stream_events`.
"""

from __future__ import annotations

from stripe_testkit.faults import FAULT_KINDS, FaultPlan
from stripe_testkit.server import DoubleSnapshot, StripeDouble

__all__ = ["FAULT_KINDS", "DoubleSnapshot", "FaultPlan", "StripeDouble"]
