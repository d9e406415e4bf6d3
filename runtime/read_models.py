"""Reads of the billing read models that more than one stage needs: SQL only.

The invoice job (`billing_jobs`) and the API (`api`) read the same tables the same way —
a tenant's subscription history (`tally.subscription_events`), its ledger rows for
billing (`tally.usage_events`) and the invoices the model issued (`tally.invoices`,
`tally.invoice_lines`) — so the statements live here, on the floor both stand on, not in
one stage for the other to copy. The tables' writers stay their owners: the projector
(`projections/`) for the history and the ledger, the billing jobs for the invoices.

Each read is a `Read`: a statement, its parameters and how its rows become values (the
schemas' types, the domain's types the caller names — `runtime` does not import
`domain` — or the frozen rows below). `fetch` runs one on a
connection, `fetch_async` on an asynchronous one, so the job (synchronous) and the API
(asynchronous) run the very same statement.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Generic, Literal, LiteralString, Protocol, TypeVar

from psycopg.rows import dict_row

from runtime.postgres import AsyncConnection, Connection
from schemas.events import SubscriptionData, SubscriptionEvent

T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)
Row = dict[str, Any]


@dataclass(frozen=True)
class Read(Generic[T]):
    """A statement, its parameters, and the value its rows (by column name) make."""

    query: LiteralString
    params: Mapping[str, Any]
    shape: Callable[[list[Row]], T]


def fetch(conn: Connection, read: Read[T]) -> T:
    with conn.cursor(row_factory=dict_row) as cur:
        return read.shape(cur.execute(read.query, read.params).fetchall())


async def fetch_async(conn: AsyncConnection, read: Read[T]) -> T:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(read.query, read.params)
        return read.shape(await cur.fetchall())


# --- the billing model's inputs --------------------------------------------------------


@dataclass(frozen=True)
class StoredEvent:
    """A subscription event of the history, with when it reached Tally."""

    event: SubscriptionEvent
    record_timestamp: datetime


def _event(tenant: str, row: Row) -> StoredEvent:
    return StoredEvent(SubscriptionEvent(
        specversion="1.0", id=row["event_id"], source=row["source"], subject=tenant,
        time=row["event_time"], type=row["type"],
        data=SubscriptionData.model_validate(row["data"])), row["record_timestamp"])


def subscription_history(tenant: str, known_at: datetime | None = None
                         ) -> Read[list[StoredEvent]]:
    """The tenant's subscription events in log order (ties of one second keep it); with
    `known_at`, only those that had reached Tally by then."""
    when: LiteralString = "" if known_at is None else " AND record_timestamp <= %(k)s"
    return Read(
        "SELECT event_id, type, source, event_time, data, record_timestamp"
        " FROM tally.subscription_events WHERE tenant_id = %(t)s" + when
        + ' ORDER BY partition, "offset", item', {"t": tenant, "k": known_at},
        lambda rows: [_event(tenant, row) for row in rows])


class LedgerRecord(Protocol[R_co]):
    """What a ledger row becomes: `domain.usage_charges.UsageRecord`, which the floor's
    `runtime` cannot import (it and `domain` are independent siblings), so the caller
    names it."""

    def __call__(self, *, time: datetime, meter: str, quantity: Decimal,
                 ingested_at: datetime, unique_value: str | None) -> R_co: ...


def usage_records(tenant: str, ingested_by: datetime, record: LedgerRecord[T], *,
                  since: datetime | None = None) -> Read[list[T]]:
    """The tenant's counted usage ingested at or before `ingested_by`, by event time (with
    `since`: from that event time on), each row a `record`.

    Event time, not the period the worker counted an event in: an event too late for its
    period is billed as an adjustment of its own cycle (docs/billing.md, rule 8).
    """
    from_: LiteralString = "" if since is None else " AND event_time >= %(s)s"
    return Read(
        "SELECT event_time, meter, quantity, ingested_at, unique_value FROM tally.usage_events"
        " WHERE tenant_id = %(t)s AND ingested_at <= %(i)s" + from_
        + " ORDER BY event_time, ingested_at", {"t": tenant, "i": ingested_by, "s": since},
        lambda rows: [record(time=r["event_time"], meter=r["meter"], quantity=r["quantity"],
                             ingested_at=r["ingested_at"], unique_value=r["unique_value"])
                      for r in rows])


# --- invoices --------------------------------------------------------------------------


@dataclass(frozen=True)
class InvoiceLineView:
    """A stored invoice line (`tally.invoice_lines`)."""

    line_no: int
    kind: str | None  # None: an invoice of the billing jobs before the subscription model
    description: str
    meter: str | None
    quantity: Decimal
    unit_amount_cents: Decimal | None
    amount_cents: int
    currency: str | None


@dataclass(frozen=True)
class InvoiceView:
    """A stored invoice (`tally.invoices`), with its lines once read (`with_lines`)."""

    invoice_id: str
    tenant_id: str
    subscription_id: str | None
    kind: str | None  # None: an invoice of the billing jobs before the subscription model
    issued_at: datetime | None
    due_at: datetime | None
    period_start: datetime
    period_end: datetime
    currency: str
    subtotal_cents: int
    total_cents: int
    status: str
    stripe_invoice_id: str | None
    # What Stripe says about it (`invoice_records`): how it is collected and the
    # customer's copy, once finalized.
    collection_method: str | None
    hosted_invoice_url: str | None
    invoice_pdf: str | None
    created_at: datetime
    lines: tuple[InvoiceLineView, ...] | None = None  # None: not read


_INVOICE_COLUMNS: Final[LiteralString] = (
    "invoice_id, tenant_id, subscription_id, kind, issued_at, due_at, period_start,"
    " period_end, currency, subtotal_cents, total_cents, status, stripe_invoice_id,"
    " collection_method, hosted_invoice_url, invoice_pdf, created_at")

InvoiceOrder = Literal["tenant_issued", "newest_period"]
_INVOICE_ORDER: Final[dict[InvoiceOrder, LiteralString]] = {
    # `tally invoices list`: each tenant's invoices by date
    "tenant_issued": "tenant_id, coalesce(issued_at, period_end), invoice_id",
    # the API and `tally report`: the newest cycles first
    "newest_period": "period_start DESC, tenant_id, invoice_id",
}


def invoices(tenants: Sequence[str] | None, *, issued_from: datetime | None = None,
             issued_to: datetime | None = None, order: InvoiceOrder = "tenant_issued",
             limit: int | None = None, offset: int = 0) -> Read[list[InvoiceView]]:
    """Invoices (without lines) of these tenants (None: every tenant), issued from
    `issued_from` (inclusive) to `issued_to` (exclusive), in `order`, paged."""
    return Read(
        "SELECT " + _INVOICE_COLUMNS + " FROM tally.invoices"
        " WHERE (%(all)s OR tenant_id = ANY(%(t)s))"
        " AND (%(f)s::timestamptz IS NULL OR coalesce(issued_at, period_end) >= %(f)s)"
        " AND (%(u)s::timestamptz IS NULL OR coalesce(issued_at, period_end) < %(u)s)"
        " ORDER BY " + _INVOICE_ORDER[order] + " LIMIT %(n)s OFFSET %(o)s",
        {"all": tenants is None, "t": list(tenants or ()), "f": issued_from,
         "u": issued_to, "n": limit, "o": offset},
        lambda rows: [InvoiceView(**row) for row in rows])


def invoice(invoice_id: str) -> Read[InvoiceView | None]:
    """One invoice (without lines); None if there is none of that id."""
    return Read("SELECT " + _INVOICE_COLUMNS + " FROM tally.invoices"
                " WHERE invoice_id = %(i)s", {"i": invoice_id},
                lambda rows: InvoiceView(**rows[0]) if rows else None)


def _by_invoice(rows: list[Row]) -> dict[str, tuple[InvoiceLineView, ...]]:
    lines: dict[str, list[InvoiceLineView]] = defaultdict(list)
    for row in rows:
        invoice_id = row.pop("invoice_id")
        lines[invoice_id].append(InvoiceLineView(**row))
    return {invoice_id: tuple(found) for invoice_id, found in lines.items()}


def invoice_lines(invoice_ids: Sequence[str]) -> Read[dict[str, tuple[InvoiceLineView, ...]]]:
    """The lines of these invoices, by invoice id, each invoice's in line order."""
    return Read(
        "SELECT invoice_id, line_no, kind, description, meter, quantity, unit_amount_cents,"
        " amount_cents, currency FROM tally.invoice_lines WHERE invoice_id = ANY(%(i)s)"
        " ORDER BY invoice_id, line_no", {"i": list(invoice_ids)}, _by_invoice)


def with_lines(heads: Sequence[InvoiceView],
               lines: dict[str, tuple[InvoiceLineView, ...]]) -> list[InvoiceView]:
    """The invoices `heads` with their `lines` (from `invoice_lines`)."""
    return [replace(head, lines=lines.get(head.invoice_id, ())) for head in heads]
