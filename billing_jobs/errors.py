"""Errors of the billing jobs."""

from schemas.errors import TallyError


class BillingError(TallyError):
    """Root of the billing jobs' errors."""


class StripeCallError(BillingError):
    """A Stripe call failed for good (not retryable, or out of attempts)."""
