"""Billing: rating (pricing), Stripe push/invoice/reconcile jobs, webhook receiver, scheduler."""
