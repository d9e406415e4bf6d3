"""The SQL of customer alerts (runtime/sql/080_notification_channels.sql): tenants'
channels for `tally notify channels`, and the delivery and dead-letter records the notifier
checks and writes (the protocol is in streams/channels/__init__.py)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from psycopg import errors as pg_errors
from psycopg.rows import class_row

from runtime.postgres import AsyncConnection, Connection, fetch_rows
from schemas.codec import dumps
from schemas.records import Notification
from streams.channels.model import Channel, target_problems
from streams.errors import ChannelError

_CHANNEL_COLUMNS = ("SELECT channel_id, tenant_id, kind, target, signing_secret, enabled,"
                    " created_at FROM tally.notification_channels")


@dataclass(frozen=True)
class DeadLetter:
    """A row of `tally.notification_dead_letters`, with its channel's kind."""

    notification_key: str
    channel_id: int
    kind: str
    tenant_id: str
    reason: str
    attempts: int
    last_error: str
    failed_at: datetime


def _table_missing(e: pg_errors.UndefinedTable) -> ChannelError:
    return ChannelError(f"no notification tables ({e.diag.message_primary}): "
                        "run `tally db migrate`")


# --- channels (the CLI) -------------------------------------------------------------------


def add_channel(conn: Connection, tenant_id: str, kind: str, target: str,
                enabled: bool = True) -> tuple[Channel, bool]:
    """Add a channel (a webhook gets a new signing secret); return it and whether it is
    new. Adding one that exists returns the existing one unchanged, so setup scripts can
    run twice."""
    problems = ([] if tenant_id.strip() else ["the tenant id is empty"]) + target_problems(
        kind, target)
    if problems:
        raise ChannelError(f"cannot add a {kind} channel: " + "; ".join(problems))
    secret = secrets.token_urlsafe(32) if kind == "webhook" else None
    try:
        with conn.transaction():
            created = fetch_rows(conn, Channel,
                                 "INSERT INTO tally.notification_channels"
                                 " (tenant_id, kind, target, signing_secret, enabled)"
                                 " VALUES (%s, %s, %s, %s, %s)"
                                 " ON CONFLICT (tenant_id, kind, target) DO NOTHING"
                                 " RETURNING channel_id, tenant_id, kind, target,"
                                 " signing_secret, enabled, created_at",
                                 (tenant_id, kind, target, secret, enabled))
            if created:
                return created[0], True
            existing = fetch_rows(conn, Channel, _CHANNEL_COLUMNS
                                  + " WHERE tenant_id = %s AND kind = %s AND target = %s",
                                  (tenant_id, kind, target))
            return existing[0], False
    except pg_errors.UndefinedTable as e:
        raise _table_missing(e) from e


def list_channels(conn: Connection, tenant_id: str | None = None) -> list[Channel]:
    """Every channel (of one tenant), by tenant and id."""
    try:
        return fetch_rows(conn, Channel, _CHANNEL_COLUMNS
                          + " WHERE %(tenant)s::text IS NULL OR tenant_id = %(tenant)s"
                          " ORDER BY tenant_id, channel_id", {"tenant": tenant_id})
    except pg_errors.UndefinedTable as e:
        raise _table_missing(e) from e


def remove_channel(conn: Connection, channel_id: int) -> Channel:
    """Delete a channel with its delivery and dead-letter records."""
    with conn.transaction():
        rows = fetch_rows(conn, Channel, "DELETE FROM tally.notification_channels"
                          " WHERE channel_id = %s RETURNING channel_id, tenant_id, kind,"
                          " target, signing_secret, enabled, created_at", (channel_id,))
    if not rows:
        raise ChannelError(f"no notification channel {channel_id}")
    return rows[0]


def set_enabled(conn: Connection, channel_id: int, enabled: bool) -> Channel:
    """Enable or disable a channel; a disabled one keeps its records and receives nothing."""
    with conn.transaction():
        rows = fetch_rows(conn, Channel, "UPDATE tally.notification_channels"
                          " SET enabled = %s WHERE channel_id = %s RETURNING channel_id,"
                          " tenant_id, kind, target, signing_secret, enabled, created_at",
                          (enabled, channel_id))
    if not rows:
        raise ChannelError(f"no notification channel {channel_id}")
    return rows[0]


def dead_letters(conn: Connection, tenant_id: str | None, limit: int) -> list[DeadLetter]:
    """The latest dead letters (of one tenant), newest first."""
    return fetch_rows(conn, DeadLetter,
                      "SELECT d.notification_key, d.channel_id, c.kind, d.tenant_id, d.reason,"
                      " d.attempts, d.last_error, d.failed_at"
                      " FROM tally.notification_dead_letters d"
                      " JOIN tally.notification_channels c USING (channel_id)"
                      " WHERE %(tenant)s::text IS NULL OR d.tenant_id = %(tenant)s"
                      " ORDER BY d.failed_at DESC LIMIT %(limit)s",
                      {"tenant": tenant_id, "limit": limit})


# --- deliveries (the notifier) ------------------------------------------------------------


async def enabled_channels(conn: AsyncConnection, tenant_id: str) -> list[Channel]:
    """The channels a notification of this tenant goes to, by id."""
    async with conn.cursor(row_factory=class_row(Channel)) as cur:
        await cur.execute(_CHANNEL_COLUMNS + " WHERE tenant_id = %s AND enabled"
                          " ORDER BY channel_id", (tenant_id,))
        return await cur.fetchall()


async def claim(conn: AsyncConnection, notification_key: str, channel_id: int) -> bool:
    """Inside the attempt's transaction: serialise with any other notifier attempting the
    same delivery, then say whether it is still to be made (neither delivered nor dead).
    The lock is held until the transaction ends, after the outcome is recorded."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                       (f"tally-notify/{notification_key}/{channel_id}",))
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM tally.notification_deliveries"
        "               WHERE notification_key = %(key)s AND channel_id = %(channel)s)"
        " OR EXISTS (SELECT 1 FROM tally.notification_dead_letters"
        "            WHERE notification_key = %(key)s AND channel_id = %(channel)s)",
        {"key": notification_key, "channel": channel_id})
    row = await cur.fetchone()
    return not (row is not None and row[0])


async def record_delivery(conn: AsyncConnection, notification_key: str, channel_id: int,
                          attempts: int) -> None:
    await conn.execute("INSERT INTO tally.notification_deliveries"
                       " (notification_key, channel_id, attempts) VALUES (%s, %s, %s)",
                       (notification_key, channel_id, attempts))


async def record_dead_letter(conn: AsyncConnection, notification_key: str, channel: Channel,
                             n: Notification, reason: str, attempts: int,
                             last_error: str) -> None:
    await conn.execute("INSERT INTO tally.notification_dead_letters (notification_key,"
                       " channel_id, tenant_id, reason, attempts, last_error, notification)"
                       " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
                       (notification_key, channel.channel_id, channel.tenant_id, reason,
                        attempts, last_error, dumps(n).decode()))
