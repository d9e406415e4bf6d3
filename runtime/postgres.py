"""Postgres for every stage: `connect` and `connect_async` (driver errors translated here),
the connection types, row helpers (`fetch_rows`, `fetch_value`), and the versioned schema
migrations: `runtime/sql/NNN_name.sql`, applied in order, once each.
Every package that talks to Postgres goes through this module.

Safe to run twice or concurrently: a transaction-scoped advisory lock serialises runners,
and each file is applied in the same transaction as its row in `tally.schema_migrations`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg.abc import Params
from psycopg.rows import class_row

from schemas.errors import TallyError

Connection = psycopg.Connection[tuple[Any, ...]]
AsyncConnection = psycopg.AsyncConnection[tuple[Any, ...]]
R = TypeVar("R")


class DatabaseUnavailable(TallyError):
    """Postgres could not be reached."""


def _unavailable(error: psycopg.OperationalError) -> DatabaseUnavailable:
    # The driver's message runs over several lines; a person needs its first and a way on.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return DatabaseUnavailable(
        f"cannot connect to Postgres: {lines[0] if lines else error}: start the dev stack "
        "with `tally dev up`, or point DATABASE_URL at a running server")


# Errors of a value Postgres cannot take (a NUL in text, a number out of range): the data's
# fault, not the database's, so retrying the same data cannot succeed.
VALUE_ERRORS: tuple[type[Exception], ...] = (psycopg.DataError,)


SQL_DIR = Path(__file__).resolve().parent / "sql"
_LOCK_ID = 0x7A11_0001


def migration_files() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(SQL_DIR.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        found.append((int(version), name, path))
    return found


def connect(database_url: str, **kwargs: Any) -> Connection:
    """A connection, with driver errors translated at this edge."""
    try:
        return psycopg.connect(database_url, **kwargs)
    except psycopg.OperationalError as e:
        raise _unavailable(e) from e


async def connect_async(database_url: str, **kwargs: Any) -> AsyncConnection:
    """An asyncio connection, with driver errors translated at this edge."""
    try:
        return await psycopg.AsyncConnection.connect(database_url, **kwargs)
    except psycopg.OperationalError as e:
        raise _unavailable(e) from e


def fetch_rows(conn: Connection, row_type: type[R], query: LiteralString,
               params: Params | None = None) -> list[R]:
    """Every row of `query`, each as a `row_type` built from its columns by name (a frozen
    dataclass whose fields are the selected columns, in any order)."""
    with conn.cursor(row_factory=class_row(row_type)) as cur:
        return cur.execute(query, params).fetchall()


def fetch_value(conn: Connection, query: LiteralString, params: Params | None = None) -> Any:
    """The first column of the first row of `query`; None when it returns no row."""
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; return the names applied."""
    applied: list[str] = []
    with connect(database_url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS tally")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS tally.schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM tally.schema_migrations")}
        for version, name, path in migration_files():
            if version in done:
                continue
            conn.execute(path.read_text())
            conn.execute(
                "INSERT INTO tally.schema_migrations (version, name) VALUES (%s, %s)",
                (version, name),
            )
            applied.append(f"{version:03d}_{name}")
    return applied
