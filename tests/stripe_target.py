"""The Stripe a contract test runs against: one suite, two targets.

- `double`: the Stripe double (always; `make test`).
- `stripe`: Stripe test mode, when `STRIPE_API_KEY` starts with `sk_test_`, through a
  recording proxy (`stripe_testkit.proxy`). `make test-stripe` runs only the contract
  tests, only on this target (`TALLY_STRIPE_TARGET=stripe`).

Either way every request the test sends — Tally's included — is checked against Stripe's
OpenAPI document (by the double itself, or by the proxy), and the fixture fails the test
if any broke it. Tests marked `double_only` need what only the double offers (its clock,
its faults, its state) and are skipped on Stripe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import stripe
from stripe_testkit import StripeDouble
from stripe_testkit.proxy import RecordingProxy

from billing_jobs import stripe_api
from runtime.settings import Settings

T = TypeVar("T")
STRIPE_KEY = os.environ.get("STRIPE_API_KEY", "")
ON_STRIPE = STRIPE_KEY.startswith("sk_test_")
ONLY_STRIPE = os.environ.get("TALLY_STRIPE_TARGET") == "stripe"


@dataclass
class Target:
    """Where the SDK and Tally send their requests, and how to read the outcome."""

    name: str
    api_key: str
    base: str
    double: StripeDouble | None = None
    proxy: RecordingProxy | None = None
    # Stripe computes meter summaries and error reports asynchronously: how long to wait.
    patience: float = 5.0
    # Parameters a test breaks on purpose (the fixture lets those requests through).
    expected_invalid: tuple[str, ...] = ()

    def expect_invalid(self, param: str) -> None:
        self.expected_invalid += (param,)

    def client(self) -> stripe.StripeClient:
        return stripe.StripeClient(
            self.api_key, base_addresses={"api": self.base, "meter_events": self.base},
            stripe_version=stripe_api.API_VERSION, max_network_retries=0)

    def settings(self, database_url: str | None = None, **overrides: Any) -> Settings:
        return Settings(database_url=database_url, stripe_api_key=self.api_key,
                        stripe_api_base=self.base, **overrides)

    def invalid_requests(self) -> list[Any]:
        """Requests that broke Stripe's OpenAPI document, except on purpose."""
        if self.double is not None:
            found = list(self.double.inspect().invalid_requests)
        else:
            assert self.proxy is not None
            found = self.proxy.invalid_requests
        return [r for r in found
                if any(p["param"] not in self.expected_invalid for p in r["problems"])]

    def eventually(self, probe: Callable[[], T], accept: Callable[[T], bool],
                   what: str) -> T:
        deadline = time.monotonic() + self.patience
        value = probe()
        while not accept(value):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: timed out waiting for {what}: {value!r}")
            time.sleep(min(2.0, self.patience / 10))
            value = probe()
        return value


def targets(request: pytest.FixtureRequest, **double_options: Any) -> Iterator[Target]:
    """The body of a `target` fixture parametrized over ("double", "stripe")."""
    if request.param == "double":
        if ONLY_STRIPE:
            pytest.skip("TALLY_STRIPE_TARGET=stripe: Stripe test mode only")
        with StripeDouble(**double_options) as double:
            target = Target("double", "sk_test_contract", double.url, double=double)
            yield target
    else:
        if not ON_STRIPE:
            if ONLY_STRIPE:
                pytest.fail("TALLY_STRIPE_TARGET=stripe needs STRIPE_API_KEY=sk_test_...")
            pytest.skip("Stripe test mode: set STRIPE_API_KEY=sk_test_... (make test-stripe)")
        if request.node.get_closest_marker("double_only"):
            pytest.skip("needs the Stripe double (its clock, faults or state)")
        if os.environ.get("TALLY_STRIPE_UPSTREAM") == "double":
            # A dry run of this target's wiring without Stripe: the proxy in front of a
            # double (`TALLY_STRIPE_UPSTREAM=double make test-stripe` with any sk_test_ key).
            with StripeDouble() as upstream, RecordingProxy(
                    api=upstream.url, meter_events=upstream.url) as proxy:
                target = Target("stripe", STRIPE_KEY, proxy.url, proxy=proxy, patience=5.0)
                yield target
        else:
            with RecordingProxy() as proxy:
                target = Target("stripe", STRIPE_KEY, proxy.url, proxy=proxy, patience=240.0)
                yield target
    assert target.invalid_requests() == [], "requests that break Stripe's OpenAPI document"
