"""The `stripe_pushes` journal: every Stripe call recorded before and after it is made.

Exactly-once effect at Stripe, over retries and crashes:
1. a row (status `pending`) with the call's deterministic idempotency key is committed
   BEFORE the call, so a crash mid-call leaves a trace that the next run finishes;
2. the call carries the same key (Stripe's `Idempotency-Key`, and for meter events the
   `identifier` too), so repeating it cannot create a second object;
3. the outcome (`succeeded` with the Stripe object id, or `failed` with the error) is
   committed after. A succeeded row is never called again.
Retryable failures (429, 5xx, connection errors and timeouts, `Stripe-Should-Retry: true`)
are retried with exponential backoff; permanent ones (bad request, auth) are recorded and
raised, never retried forever. Problems found before any call (no Stripe customer, no
price, a meter Stripe does not know) are recorded as `failed` rows too (`record_failure`),
so the journal is the one place to look for why something was not billed.

A batch call (`call_batch`, the v2 meter event stream) journals every item under its own
key, exactly as `call` does, so a crashed high-volume run is finished by either mode.
`entries` reads the journal back (`tally jobs journal`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import stripe
from psycopg.types.json import Jsonb

from billing_jobs import metrics
from billing_jobs.errors import StripeCallError
from runtime.postgres import Connection, fetch_rows

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 8.0
    # Per request. A timed-out request may have taken effect; the retry carries the same
    # idempotency key, so Stripe answers it with the first outcome instead of doing it twice.
    timeout: float = 30.0

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


def succeeded_object(conn: Connection, key: str) -> str | None:
    """The Stripe object id of a call already made successfully with this key."""
    row = conn.execute(
        "SELECT stripe_object_id FROM tally.stripe_pushes"
        " WHERE idempotency_key = %s AND status = 'succeeded'", (key,),
    ).fetchone()
    return None if row is None else str(row[0])


def call(
    conn: Connection, *, key: str, kind: str, tenant_id: str, summary: dict[str, Any],
    request: Callable[[str], Any], policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Make one journaled Stripe call; return the Stripe object id.

    `request(idempotency_key)` performs the call and returns the Stripe object. `conn` must
    be in autocommit mode: each journal write is its own durable step.
    """
    done = succeeded_object(conn, key)
    if done is not None:
        return done

    def send() -> list[str]:
        obj = request(key)
        return [str(getattr(obj, "id", None) or getattr(obj, "identifier", None) or key)]

    return _journaled(conn, [(key, tenant_id, summary)], kind, send, policy, sleep)[0]


def call_batch(
    conn: Connection, *, items: list[tuple[str, str, dict[str, Any]]], kind: str,
    request: Callable[[], Any], policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep,
) -> None:
    """One Stripe call carrying several (key, tenant, summary) items, each journaled alone.

    For calls whose items are idempotent by their keys (meter event `identifier`s), so a
    repeated batch cannot count an item twice; the object id recorded is the key.
    """

    def send() -> list[str]:
        request()
        return [key for key, _, _ in items]

    _journaled(conn, items, kind, send, policy, sleep)


def read(request: Callable[[], T], policy: RetryPolicy,
         sleep: Callable[[float], None] = time.sleep) -> T:
    """A read (retrieve, list): nothing to journal, retried like a call."""
    for attempt in range(policy.attempts):
        try:
            return request()
        except stripe.StripeError as e:
            if not is_retryable(e) or attempt + 1 == policy.attempts:
                raise
            sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def record_failure(conn: Connection, *, key: str, kind: str, tenant_id: str,
                   summary: dict[str, Any], error: str, reason: str) -> None:
    """Journal a call that could not even be made (see the module docstring)."""
    conn.execute(
        "INSERT INTO tally.stripe_pushes (idempotency_key, kind, tenant_id, request_summary,"
        " status, last_error) VALUES (%s, %s, %s, %s, 'failed', %s)"
        " ON CONFLICT (idempotency_key) DO UPDATE SET status = 'failed',"
        " last_error = excluded.last_error, updated_at = now()"
        " WHERE tally.stripe_pushes.status <> 'succeeded'",
        (key, kind, tenant_id, Jsonb(summary), error),
    )
    metrics.STRIPE_CALLS.labels(kind, reason).inc()


@dataclass(frozen=True)
class JournalEntry:
    """One journaled Stripe call, as `tally jobs journal` lists it."""

    updated_at: datetime
    status: str
    kind: str
    tenant_id: str
    idempotency_key: str
    attempts: int
    detail: str  # the last error, else the Stripe object id, else ""


def entries(conn: Connection, statuses: Sequence[str], limit: int) -> list[JournalEntry]:
    """The `limit` most recently updated calls whose status is one of `statuses`."""
    return fetch_rows(
        conn, JournalEntry,
        "SELECT updated_at, status, kind, tenant_id, idempotency_key, attempts,"
        " coalesce(last_error, stripe_object_id, '') AS detail FROM tally.stripe_pushes"
        " WHERE status = ANY(%s) ORDER BY updated_at DESC LIMIT %s",
        (list(statuses), limit),
    )


def _journaled(
    conn: Connection, items: list[tuple[str, str, dict[str, Any]]], kind: str,
    send: Callable[[], list[str]], policy: RetryPolicy, sleep: Callable[[float], None],
) -> list[str]:
    keys = [key for key, _, _ in items]
    tenants = sorted({tenant for _, tenant, _ in items})
    who = tenants[0] if len(tenants) == 1 else f"{len(tenants)} tenants"
    # Step 1: the intent is durable before the call.
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO tally.stripe_pushes (idempotency_key, kind, tenant_id, request_summary,"
            " status) VALUES (%s, %s, %s, %s, 'pending')"
            " ON CONFLICT (idempotency_key) DO UPDATE SET status = 'pending', updated_at = now()",
            [(key, kind, tenant, Jsonb(summary)) for key, tenant, summary in items],
        )
    for attempt in range(policy.attempts):
        conn.execute(
            "UPDATE tally.stripe_pushes SET attempts = attempts + 1, updated_at = now()"
            " WHERE idempotency_key = ANY(%s)", (keys,),
        )
        try:
            object_ids = send()
        except stripe.StripeError as e:
            if is_duplicate_identifier(e):
                object_ids = keys  # an earlier attempt got through; the identifier is the id
            elif is_retryable(e) and attempt + 1 < policy.attempts:
                metrics.STRIPE_CALLS.labels(kind, "retried").inc()
                sleep(policy.delay(attempt))
                continue
            else:
                # Step 3, failure: recorded, then surfaced to the job, which goes on with
                # the other tenants.
                error = f"{type(e).__name__}: {e.user_message or e}"
                for key in keys:
                    _finish(conn, key, "failed", None, error)
                metrics.STRIPE_CALLS.labels(kind, "failed").inc()
                raise StripeCallError(f"{kind} for {who}: {e.user_message or e}") from e
        # Step 3, success: a succeeded row is never called again.
        for key, object_id in zip(keys, object_ids, strict=True):
            _finish(conn, key, "succeeded", object_id, None)
        metrics.STRIPE_CALLS.labels(kind, "succeeded").inc()
        return object_ids
    raise AssertionError("unreachable")  # pragma: no cover


def _finish(conn: Connection, key: str, status: str, object_id: str | None,
            error: str | None) -> None:
    conn.execute(
        "UPDATE tally.stripe_pushes SET status = %s, stripe_object_id = %s, last_error = %s,"
        " updated_at = now() WHERE idempotency_key = %s",
        (status, object_id, error, key),
    )
