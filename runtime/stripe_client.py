"""The Stripe client every stage configures the same way: the pinned API version, the
address (`STRIPE_API_BASE`: the Stripe double in dev and tests), no SDK retries (callers
retry with the same idempotency key)."""

from __future__ import annotations

import stripe

from runtime.settings import Settings, SettingsError

# The Stripe API version Tally speaks: the SDK's pinned version (its types are generated
# from that version's OpenAPI document). Changing it is an upgrade, with a contract run.
API_VERSION = "2026-10-28.endive"


class StripeNotConfigured(SettingsError):
    """No Stripe key is set."""


def stripe_client(settings: Settings, timeout: float = 30.0) -> stripe.StripeClient:
    """A client for `settings`; StripeNotConfigured without STRIPE_API_KEY."""
    if not settings.stripe_api_key:
        raise StripeNotConfigured(
            "no Stripe: set STRIPE_API_KEY (a test-mode key, sk_test_...)")
    bases: dict[str, str] = {}
    if settings.stripe_api_base:
        bases = {"api": settings.stripe_api_base, "meter_events": settings.stripe_api_base}
    return stripe.StripeClient(
        settings.stripe_api_key, base_addresses=bases,  # type: ignore[arg-type]
        stripe_version=API_VERSION, max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout),
    )
