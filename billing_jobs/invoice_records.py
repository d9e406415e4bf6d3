"""What Tally records about each invoice it sent to Stripe, beside the amounts: how Stripe
collects it, and the customer's copy (`hosted_invoice_url`, `invoice_pdf`), which
`tally invoices list/show` print beside the invoice (`runtime.read_models.InvoiceView`).

The links come from Stripe's answer to finalize and from the `invoice.finalized` /
`invoice.paid` webhooks, whichever arrives first; a later answer without them never
erases them. The collection method is decided once per invoice, when it is first sent,
and kept, so a retried create sends the same parameters under its key.
"""

from __future__ import annotations

from typing import Final, LiteralString

from runtime.postgres import Connection

# Shared with the webhook receiver's async connection: (hosted_invoice_url, invoice_pdf,
# stripe invoice id).
RECORD_LINKS: Final[LiteralString] = (
    "UPDATE tally.invoices SET hosted_invoice_url = coalesce(%s, hosted_invoice_url),"
    " invoice_pdf = coalesce(%s, invoice_pdf), updated_at = now()"
    " WHERE stripe_invoice_id = %s")


def record_links(conn: Connection, stripe_invoice_id: str, hosted_invoice_url: str | None,
                 invoice_pdf: str | None) -> None:
    conn.execute(RECORD_LINKS, (hosted_invoice_url, invoice_pdf, stripe_invoice_id))


def decided_collection(conn: Connection, invoice_id: str) -> str | None:
    row = conn.execute("SELECT collection_method FROM tally.invoices WHERE invoice_id = %s",
                       (invoice_id,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def record_collection(conn: Connection, invoice_id: str, method: str) -> str:
    """Keep the first decision for the invoice; return the one kept."""
    conn.execute("UPDATE tally.invoices SET collection_method = %s"
                 " WHERE invoice_id = %s AND collection_method IS NULL", (method, invoice_id))
    return decided_collection(conn, invoice_id) or method
