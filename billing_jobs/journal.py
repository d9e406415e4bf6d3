"""The `stripe_pushes` journal: every Stripe call recorded before and after it is made.

Exactly-once effect at Stripe, over retries and crashes:
1. a row (status `pending`) with the call's deterministic idempotency key is committed
   BEFORE the call, so a crash mid-call leaves a trace that the next run finishes;
2. the call carries the same key (Stripe's `Idempotency-Key`, and for meter events the
   `identifier` too), so repeating it cannot create a second object;
3. the outcome (`succeeded` with the Stripe object id, or `failed` with the error) is
   committed after. A succeeded row is never called again.
Retryable failures (429, 5xx, connection errors, `Stripe-Should-Retry: true`) are retried
with exponential backoff; permanent ones (bad request, auth) are recorded and raised.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import stripe
from psycopg.types.json import Jsonb

from billing_jobs import metrics
from billing_jobs.errors import StripeCallError

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        # Full jitter: spreads retries of parallel jobs apart.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def is_retryable(error: stripe.StripeError) -> bool:
    """Should the same request be sent again later?

    429s always are (Stripe asks clients to back off and retry them, whatever the
    header says); otherwise `Stripe-Should-Retry` decides when present.
    """
    if isinstance(error, stripe.RateLimitError):
        return True
    should_retry = (error.headers or {}).get("stripe-should-retry")
    if should_retry is not None:
        return should_retry == "true"
    if isinstance(error, stripe.APIConnectionError):
        return True
    return isinstance(error, stripe.APIError) or (error.http_status or 0) >= 500


def is_duplicate_identifier(error: stripe.StripeError) -> bool:
    """Stripe refuses a meter event whose identifier it has seen: it already arrived."""
    return isinstance(error, stripe.InvalidRequestError) and (
        "already exists with identifier" in (error.user_message or str(error))
    )


def succeeded_object(conn: Conn, key: str) -> str | None:
    """The Stripe object id of a call already made successfully with this key."""
    row = conn.execute(
        "SELECT stripe_object_id FROM tally.stripe_pushes"
        " WHERE idempotency_key = %s AND status = 'succeeded'", (key,),
    ).fetchone()
    return None if row is None else str(row[0])


def call(
    conn: Conn, *, key: str, kind: str, tenant_id: str, summary: dict[str, Any],
    request: Callable[[str], Any], policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Make one journaled Stripe call; return the Stripe object id.

    `request(idempotency_key)` performs the call and returns the Stripe object. `conn` must
    be in autocommit mode: each journal write is its own durable step.
    """
    done = succeeded_object(conn, key)
    if done is not None:
        return done
    conn.execute(
        "INSERT INTO tally.stripe_pushes (idempotency_key, kind, tenant_id, request_summary,"
        " status) VALUES (%s, %s, %s, %s, 'pending')"
        " ON CONFLICT (idempotency_key) DO UPDATE SET status = 'pending', updated_at = now()",
        (key, kind, tenant_id, Jsonb(summary)),
    )
    for attempt in range(policy.attempts):
        conn.execute(
            "UPDATE tally.stripe_pushes SET attempts = attempts + 1, updated_at = now()"
            " WHERE idempotency_key = %s", (key,),
        )
        try:
            obj = request(key)
            object_id = str(getattr(obj, "id", None) or getattr(obj, "identifier", None) or key)
        except stripe.StripeError as e:
            if is_duplicate_identifier(e):
                object_id = key  # an earlier attempt got through; the identifier is the id
            elif is_retryable(e) and attempt + 1 < policy.attempts:
                metrics.STRIPE_CALLS.labels(kind, "retried").inc()
                sleep(policy.delay(attempt))
                continue
            else:
                _finish(conn, key, "failed", None, f"{type(e).__name__}: {e.user_message or e}")
                metrics.STRIPE_CALLS.labels(kind, "failed").inc()
                raise StripeCallError(f"{kind} for {tenant_id}: {e.user_message or e}") from e
        _finish(conn, key, "succeeded", object_id, None)
        metrics.STRIPE_CALLS.labels(kind, "succeeded").inc()
        return object_id
    raise AssertionError("unreachable")  # pragma: no cover


def _finish(conn: Conn, key: str, status: str, object_id: str | None, error: str | None) -> None:
    conn.execute(
        "UPDATE tally.stripe_pushes SET status = %s, stripe_object_id = %s, last_error = %s,"
        " updated_at = now() WHERE idempotency_key = %s",
        (status, object_id, error, key),
    )
