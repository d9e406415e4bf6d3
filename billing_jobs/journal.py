"""The `stripe_pushes` journal: every Stripe call recorded before and after it is made.

Exactly-once effect at Stripe, over retries and crashes of any length:
1. a row (status `pending`) with the call's deterministic idempotency key is committed
   BEFORE the call, so a crash mid-call leaves a trace that the next run finishes;
2. the call carries the same key (Stripe's `Idempotency-Key`, and for meter events the
   `identifier` too), so repeating it while Stripe remembers the key cannot create a
   second object;
3. the outcome (`succeeded` with the Stripe object id, or `failed` with the error) is
   committed after. A succeeded row is never called again.

Stripe's memory is finite and the journal does not lean on it beyond what Stripe
promises: a key is remembered for AT LEAST 24 hours (maybe longer), and a key holds
whatever the first request under it got — including an error, even a 500 (replayed with
`Idempotent-Replayed: true`). So an unfinished call is sent again under its own key only
while that is safe: its first try is less than 24 hours old (on the job's clock) and its
key holds no error. Otherwise (`call` with a `lookup`):
4. look up what Stripe already has for the call (an invoice by its metadata, an item on
   its invoice, ...). Found: the row is `succeeded` with that object, nothing is sent.
   Not found: the row is `replaced`, and the call is sent under a NEW key (generation
   n+1, `stripe_ids.idempotency_key`), journaled as its own row like step 1.
A key holding a stored error is found out in the run that meets it (a replayed 5xx, or
a 4xx, which Stripe stores) and recovered right away; a failed call is retried on later
runs no sooner than `retry_after` its last try, so a call that keeps failing adds rows
slowly (the delay doubles, up to a day). Meter events are resolved the same way, but per
period against Stripe's meter event summaries (`push_usage.py`).

Retryable failures (429, 5xx, connection errors and timeouts, `Stripe-Should-Retry: true`)
are retried with exponential backoff within a run; permanent ones (bad request, auth) are
recorded and raised. Problems found before any call (no Stripe customer, no price, a
meter Stripe does not know) are recorded as `failed` rows too (`record_failure`), and so
are meter events Stripe rejects asynchronously (`record_rejection`, from the webhook), so
the journal is the one place to look for why something was not billed.

A batch call (`call_batch`, the v2 meter event stream) journals every item under its own
key, exactly as a single call does, so a crashed high-volume run is finished by either
mode. `entries` reads the journal back (`tally jobs journal`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import stripe
from psycopg.types.json import Jsonb

from billing_jobs import metrics, stripe_ids
from billing_jobs.errors import StripeCallError
from runtime.postgres import Connection, fetch_rows

T = TypeVar("T")

# Stripe keeps idempotency keys and meter event identifiers at least this long.
STRIPE_MEMORY = timedelta(hours=24)
# A failed call's next new key waits this long after its last try, doubling per key.
RETRY_BASE = timedelta(minutes=5)
# New keys one call may get within one run (each after a lookup found nothing).
MAX_NEW_KEYS_PER_RUN = 3

Lookup = Callable[[], str | None]
"""Finds the object Stripe already holds for a call (its id), or None if it has none."""


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


def retry_after(generation: int) -> timedelta:
    """How long after its last try a failed call is sent again under a new key."""
    factor: int = 2 ** min(generation, 16)
    return min(RETRY_BASE * factor, STRIPE_MEMORY)


def is_retryable(error: stripe.StripeError) -> bool:
    """Should the same request be sent again later?

    429s always are (Stripe asks clients to back off and retry them, whatever the
    header says); otherwise `Stripe-Should-Retry` decides when present. A replayed error
    never is: the key holds it, so the same request can only get it again.
    """
    if is_replayed(error):
        return False
    if isinstance(error, stripe.RateLimitError):
        return True
    should_retry = (error.headers or {}).get("stripe-should-retry")
    if should_retry is not None:
        return should_retry == "true"
    if isinstance(error, stripe.APIConnectionError):
        return True
    return isinstance(error, stripe.APIError) or (error.http_status or 0) >= 500


def is_replayed(error: stripe.StripeError) -> bool:
    """Is this error Stripe's stored answer to an earlier request under the same key?"""
    return (error.headers or {}).get("idempotent-replayed") == "true"


def spends_key(error: stripe.StripeError) -> bool:
    """Does Stripe now hold this error under the request's key, for every retry?

    Stripe stores the outcome of every request that reached the API method: a replayed
    error shows it did, and so does a 4xx other than a rate limit or an authentication
    failure (refused before the method). An idempotency error means the key belongs to
    another request.
    """
    status = error.http_status or 0
    if is_replayed(error) or isinstance(error, stripe.IdempotencyError):
        return True
    return 400 <= status < 500 and status not in (401, 403, 429)


def is_duplicate_identifier(error: stripe.StripeError) -> bool:
    """Stripe refuses a meter event whose identifier it has seen: it already arrived."""
    return isinstance(error, stripe.InvalidRequestError) and (
        "already exists with identifier" in (error.user_message or str(error))
    )


def succeeded_object(conn: Connection, key: str) -> str | None:
    """The Stripe object id of a call (by its first key) already made successfully."""
    row = conn.execute(
        "SELECT stripe_object_id FROM tally.stripe_pushes"
        " WHERE logical_key = %s AND status = 'succeeded' LIMIT 1", (key,),
    ).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class Row:
    """A journal row, as the resume rules read it."""

    idempotency_key: str
    logical_key: str
    generation: int
    status: str
    stripe_object_id: str | None
    last_error: str | None
    key_spent: bool
    first_tried_at: datetime
    last_tried_at: datetime
    request_summary: dict[str, Any]
    attempts: int

    def resendable(self, now: datetime) -> bool:
        """May this unfinished call be sent again under its own key? Always, if it never
        reached Stripe (a problem found before any call: `record_failure`)."""
        if self.attempts == 0:
            return True
        return not self.key_spent and now - self.first_tried_at < STRIPE_MEMORY

    def due(self, now: datetime) -> bool:
        """May a failed call get its next key now (see `retry_after`)?"""
        return self.status != "failed" or now - self.last_tried_at >= retry_after(
            self.generation)


_ROW_COLUMNS = ("idempotency_key, logical_key, generation, status, stripe_object_id,"
                " last_error, key_spent, first_tried_at, last_tried_at, request_summary,"
                " attempts")


def latest(conn: Connection, logical_key: str) -> Row | None:
    """The newest key's row of a call (by its first key)."""
    rows = fetch_rows(conn, Row, "SELECT " + _ROW_COLUMNS + " FROM tally.stripe_pushes"
                      " WHERE logical_key = %s ORDER BY generation DESC LIMIT 1",
                      (logical_key,))
    return rows[0] if rows else None


def series(conn: Connection, kind: str, logical_key: str) -> list[Row]:
    """Every row sharing a logical key (a meter event series), oldest first."""
    return fetch_rows(conn, Row, "SELECT " + _ROW_COLUMNS + " FROM tally.stripe_pushes"
                      " WHERE kind = %s AND logical_key = %s"
                      " ORDER BY first_tried_at, created_at, idempotency_key",
                      (kind, logical_key))


def call(
    conn: Connection, *, key: str, kind: str, tenant_id: str, summary: dict[str, Any],
    request: Callable[[str], Any], policy: RetryPolicy, lookup: Lookup | None = None,
    now: datetime | None = None, sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Make one journaled Stripe call; return the Stripe object id.

    `key` is the call's readable first key (also its `logical_key`); the idempotency key
    sent is `stripe_ids.idempotency_key(key, generation)`. `request(idempotency_key)`
    performs the call and returns the Stripe object. `lookup` finds what Stripe already
    has for the call (step 4 of the module docstring); without one, an unfinished call
    is always sent again under its own key. `now` is the job's clock. `conn` must be in
    autocommit mode: each journal write is its own durable step.
    """
    now = now or datetime.now(UTC)
    row = latest(conn, key)
    if row is not None and row.status == "succeeded":
        return str(row.stripe_object_id)
    met_stored_error = False  # in this run: the key holds an error, recover right away
    for _ in range(MAX_NEW_KEYS_PER_RUN + 1):
        generation = 0 if row is None else row.generation
        if row is not None and not row.resendable(now) and lookup is not None:
            if not (met_stored_error or row.due(now)):
                raise StripeCallError(
                    f"{kind} {key}: failed ({row.last_error}); next try after "
                    f"{row.last_tried_at + retry_after(row.generation):%Y-%m-%d %H:%M} UTC")
            found = read(lookup, policy, sleep)
            if found is not None:
                _found(conn, row.idempotency_key, found)
                metrics.STRIPE_CALLS.labels(kind, "found").inc()
                return found
            generation += 1
            replace(conn, row.idempotency_key, stripe_ids.idempotency_key(key, generation))
        idempotency_key = stripe_ids.idempotency_key(key, generation)

        def send(k: str = idempotency_key) -> list[str]:
            obj = request(k)
            return [str(getattr(obj, "id", None) or getattr(obj, "identifier", None) or k)]

        try:
            return _journaled(conn, [(idempotency_key, tenant_id, summary)], kind, send,
                              policy, sleep, logical_key=key, generation=generation,
                              now=now)[0]
        except StripeCallError:
            row = latest(conn, key)
            if lookup is None or row is None or not row.key_spent:
                raise
            met_stored_error = True
    raise StripeCallError(f"{kind} {key}: Stripe keeps failing it under new keys")


def send_once(
    conn: Connection, *, key: str, logical_key: str, kind: str, tenant_id: str,
    summary: dict[str, Any], request: Callable[[str], Any], policy: RetryPolicy,
    now: datetime | None = None, generation: int = 0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """One journaled call under exactly `key` (the caller resolved what to send: meter
    events). A succeeded key is not sent again."""
    done = conn.execute("SELECT stripe_object_id FROM tally.stripe_pushes"
                        " WHERE idempotency_key = %s AND status = 'succeeded'",
                        (key,)).fetchone()
    if done is not None:
        return str(done[0])

    def send() -> list[str]:
        obj = request(key)
        return [str(getattr(obj, "id", None) or getattr(obj, "identifier", None) or key)]

    return _journaled(conn, [(key, tenant_id, summary)], kind, send, policy, sleep,
                      logical_key=logical_key, generation=generation,
                      now=now or datetime.now(UTC))[0]


def call_batch(
    conn: Connection, *, items: list[tuple[str, str, dict[str, Any]]], kind: str,
    logical_keys: list[str], request: Callable[[], Any], policy: RetryPolicy,
    now: datetime | None = None, sleep: Callable[[float], None] = time.sleep,
) -> None:
    """One Stripe call carrying several (key, tenant, summary) items, each journaled alone.

    For calls whose items are idempotent by their keys (meter event `identifier`s), so a
    repeated batch cannot count an item twice; the object id recorded is the key.
    """

    def send() -> list[str]:
        request()
        return [key for key, _, _ in items]

    _journaled(conn, items, kind, send, policy, sleep, logical_keys=logical_keys,
               now=now or datetime.now(UTC))


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
        "INSERT INTO tally.stripe_pushes (idempotency_key, logical_key, kind, tenant_id,"
        " request_summary, status, last_error) VALUES (%s, %s, %s, %s, %s, 'failed', %s)"
        " ON CONFLICT (idempotency_key) DO UPDATE SET status = 'failed',"
        " last_error = excluded.last_error, updated_at = now()"
        " WHERE tally.stripe_pushes.status NOT IN ('succeeded', 'replaced')",
        (stripe_ids.idempotency_key(key), key, kind, tenant_id, Jsonb(summary), error),
    )
    metrics.STRIPE_CALLS.labels(kind, reason).inc()


def record_rejection(conn: Connection, *, identifier: str, code: str, message: str,
                     report: str) -> bool:
    """A meter event Stripe accepted, then rejected (a meter error report): its row turns
    `failed` with the reason, and its key is spent (the next push-usage run looks up the
    period's summary and sends what is missing under a new identifier). An identifier
    Tally never journaled gets a row of its own, so the rejection still shows. Returns
    whether the identifier was Tally's."""
    error = f"rejected by Stripe after acceptance: {code}: {message} (report {report})"
    updated = conn.execute(
        "UPDATE tally.stripe_pushes SET status = 'failed', key_spent = true,"
        " last_error = %s, updated_at = now()"
        " WHERE idempotency_key = %s AND kind = 'meter_event'", (error, identifier),
    ).rowcount
    if not updated:
        conn.execute(
            "INSERT INTO tally.stripe_pushes (idempotency_key, logical_key, kind, tenant_id,"
            " request_summary, status, last_error, key_spent)"
            " VALUES (%s, %s, 'meter_event', '?', %s, 'failed', %s, true)"
            " ON CONFLICT (idempotency_key) DO NOTHING",
            (identifier, identifier, Jsonb({"unknown_identifier": identifier}), error))
    metrics.METER_EVENT_REJECTIONS.labels(code).inc()
    return bool(updated)


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
        " coalesce(last_error, stripe_object_id, '')"
        "  || CASE WHEN replaced_by IS NULL THEN '' ELSE ' -> replaced by ' || replaced_by END"
        " AS detail FROM tally.stripe_pushes"
        " WHERE status = ANY(%s) ORDER BY updated_at DESC LIMIT %s",
        (list(statuses), limit),
    )


def _journaled(
    conn: Connection, items: list[tuple[str, str, dict[str, Any]]], kind: str,
    send: Callable[[], list[str]], policy: RetryPolicy, sleep: Callable[[float], None], *,
    now: datetime, logical_key: str | None = None, logical_keys: list[str] | None = None,
    generation: int = 0,
) -> list[str]:
    keys = [key for key, _, _ in items]
    logicals = logical_keys or [logical_key or key for key in keys]
    tenants = sorted({tenant for _, tenant, _ in items})
    who = tenants[0] if len(tenants) == 1 else f"{len(tenants)} tenants"
    # Step 1: the intent is durable before the call. A key sent again keeps its first try.
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO tally.stripe_pushes (idempotency_key, logical_key, generation, kind,"
            " tenant_id, request_summary, status, first_tried_at, last_tried_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s, %s)"
            " ON CONFLICT (idempotency_key) DO UPDATE SET status = 'pending', updated_at = now(),"
            " first_tried_at = CASE WHEN tally.stripe_pushes.attempts = 0"
            "  THEN excluded.first_tried_at ELSE tally.stripe_pushes.first_tried_at END",
            [(key, logical, generation, kind, tenant, Jsonb(summary), now, now)
             for (key, tenant, summary), logical in zip(items, logicals, strict=True)],
        )
    for attempt in range(policy.attempts):
        conn.execute(
            "UPDATE tally.stripe_pushes SET attempts = attempts + 1, last_tried_at = %s,"
            " updated_at = now() WHERE idempotency_key = ANY(%s)", (now, keys),
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
                # Step 3, failure: recorded (with whether the key now holds the error),
                # then surfaced to the job, which goes on with the other tenants.
                error = f"{type(e).__name__}: {e.user_message or e}"
                if is_replayed(e):
                    error += " (stored under the idempotency key)"
                for key in keys:
                    _finish(conn, key, "failed", None, error, spent=spends_key(e))
                metrics.STRIPE_CALLS.labels(kind, "failed").inc()
                raise StripeCallError(f"{kind} for {who}: {e.user_message or e}") from e
        # Step 3, success: a succeeded row is never called again.
        for key, object_id in zip(keys, object_ids, strict=True):
            _finish(conn, key, "succeeded", object_id, None)
        metrics.STRIPE_CALLS.labels(kind, "succeeded").inc()
        return object_ids
    raise AssertionError("unreachable")  # pragma: no cover


def found_at_stripe(conn: Connection, key: str, object_id: str) -> None:
    """A lookup found the call's effect at Stripe: the row is `succeeded`."""
    _found(conn, key, object_id)


def replace(conn: Connection, key: str, replaced_by: str) -> None:
    """A lookup found the call's effect missing; it goes out under `replaced_by`."""
    conn.execute(
        "UPDATE tally.stripe_pushes SET status = 'replaced', replaced_by = %s,"
        " updated_at = now() WHERE idempotency_key = %s", (replaced_by, key))


def _found(conn: Connection, key: str, object_id: str) -> None:
    conn.execute(
        "UPDATE tally.stripe_pushes SET status = 'succeeded', stripe_object_id = %s,"
        " last_error = coalesce(last_error || '; ', '') || 'found at Stripe by lookup',"
        " updated_at = now() WHERE idempotency_key = %s", (object_id, key))


def _finish(conn: Connection, key: str, status: str, object_id: str | None,
            error: str | None, *, spent: bool = False, replaced_by: str | None = None) -> None:
    conn.execute(
        "UPDATE tally.stripe_pushes SET status = %s, stripe_object_id = %s, last_error = %s,"
        " key_spent = key_spent OR %s, replaced_by = %s, updated_at = now()"
        " WHERE idempotency_key = %s",
        (status, object_id, error, spent, replaced_by, key),
    )
