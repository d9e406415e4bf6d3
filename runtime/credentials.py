"""Tenant-scoped credentials: the tokens file every Tally server with an HTTP surface reads.

The file (setting `TALLY_TOKENS_FILE`) maps each bearer token to what it may do::

    {"<token>": {"service": "svc/billing",
                 "tenants": ["acme", "globex"],
                 "scopes": ["usage", "subscriptions", "quota"]}}

- `service`: who holds the token. The ingest gateway takes it as the allowed `source`
  prefix of the events the token publishes.
- `tenants`: the tenants the token acts for: a list of tenant ids, or `"*"` for every
  tenant.
- `scopes`: what it may do, at least one of `SCOPES` (see `SCOPE_MEANINGS`). The API
  (`api/`) takes `read` for a tenant's data, `admin` for that and its admin views,
  `usage` to consume entitlements, `quota` to check them and `subscriptions` to open
  checkout and portal sessions.

The old form, `{"<token>": "<service>"}`, gave every token every tenant and every kind of
event; it is refused, with each entry written out in the new form (same rights: all
tenants, `usage` and `subscriptions`) for the user to narrow.

Checking a request is two steps, both here so every server does them the same way:
1. `Tokens.authenticate` finds the credential of an `Authorization: Bearer` header,
   comparing the presented token with every known one in constant time (no timing hint of
   a near miss, nor of which entry matched). No credential: the server answers 401.
2. `authorize` (pure) lists every rule a use of the credential breaks: the tenant is not
   among its tenants, or the scope the action needs is missing. Any: 403, naming the rules.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.settings import SettingsError
from schemas.codec import dumps, loads
from schemas.events import SUBSCRIPTION_TYPES, USAGE_TYPE, check_tenant

Scope = Literal["usage", "subscriptions", "quota", "read", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
SCOPE_MEANINGS: Mapping[Scope, str] = {
    "usage": "publish usage events (tally.usage.v1) for its tenants",
    "subscriptions": "publish subscription events (tally.subscription.*.v1) for its tenants",
    "quota": "read its tenants' quota decisions (the worker's GET /quota, the API's "
             "entitlement checks)",
    "read": "read its tenants' usage, subscription and invoices (the API, `tally api serve`)",
    "admin": "read every tenant it acts for and the API's /v1/admin views",
}
ALL_TENANTS = "*"
# What the old form's tokens could do: publish any event for any tenant.
OLD_FORM_SCOPES: tuple[Scope, ...] = ("usage", "subscriptions")

Rule = Literal["tenant_not_allowed", "scope_missing"]


def scope_to_publish(event_type: str) -> Scope | None:
    """The scope publishing an event of `event_type` needs; None for a type Tally lacks."""
    if event_type == USAGE_TYPE:
        return "usage"
    if event_type in SUBSCRIPTION_TYPES:
        return "subscriptions"
    return None


class CredentialsError(SettingsError):
    """The tokens file is missing or invalid; the message lists every problem."""


class Credential(BaseModel):
    """What one bearer token may do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    service: str = Field(min_length=1, max_length=256)
    tenants: Literal["*"] | frozenset[str]
    scopes: frozenset[Scope] = Field(min_length=1)

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenants(cls, value: Any) -> Any:
        if value == ALL_TENANTS:
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(f'must be "{ALL_TENANTS}" (every tenant) or a non-empty list '
                             "of tenant ids")
        if ALL_TENANTS in value:
            raise ValueError(f'for every tenant write "tenants": "{ALL_TENANTS}", not a '
                             "list holding it")
        for tenant in value:
            if not isinstance(tenant, str):
                raise ValueError(f"tenant ids are strings, not {tenant!r}")
            check_tenant(tenant)
        return frozenset(value)

    @field_validator("scopes", mode="before")
    @classmethod
    def _scopes(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError(f"must be a list of scopes, some of: {', '.join(SCOPES)}")
        return value

    def acts_for(self, tenant: str) -> bool:
        """Whether the token may act for `tenant`."""
        return self.tenants == ALL_TENANTS or tenant in self.tenants


@dataclass(frozen=True, slots=True)
class Denial:
    """One rule a request breaks: `rule` for programs, `message` for people."""

    rule: Rule
    message: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "message": self.message}


def authorize(credential: Credential, tenant: str, scope: Scope) -> tuple[Denial, ...]:
    """Every rule broken by `credential` acting for `tenant` with `scope`; () when allowed.

    Pure: the servers decide what a denial answers (403) and how they report it.
    """
    denials: list[Denial] = []
    if not credential.acts_for(tenant):
        denials.append(Denial("tenant_not_allowed",
                              f"tenant not allowed: {tenant!r} is not one of this token's "
                              "tenants"))
    if scope not in credential.scopes:
        have = ", ".join(s for s in SCOPES if s in credential.scopes)
        denials.append(Denial("scope_missing",
                              f"scope missing: {scope!r} is needed to {SCOPE_MEANINGS[scope]}"
                              f"; this token has: {have}"))
    return tuple(denials)


def _digest(token: str) -> bytes:
    # Fixed-length digests: comparing them takes the same time whatever the lengths.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Tokens:
    """The credentials of a tokens file, found by bearer token in constant time."""

    def __init__(self, credentials: Mapping[str, Credential]) -> None:
        self._entries = [(_digest(token), c) for token, c in credentials.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Credential | None:
        """The credential of `token`, if any. Every entry is compared, each in constant
        time, so the time taken says nothing about how close a guess came."""
        presented = _digest(token)
        found: Credential | None = None
        for known, credential in self._entries:
            if hmac.compare_digest(known, presented):
                found = credential
        return found

    def authenticate(self, authorization: str | None) -> Credential | None:
        """The credential of an `Authorization: Bearer <token>` header value; None when the
        header is missing, of another scheme or names no known token."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        return self.lookup(token)

    @classmethod
    def parse(cls, document: Any, source: str = "tokens file") -> Tokens:
        """Tokens from a decoded tokens file; CredentialsError lists every problem."""
        if not isinstance(document, dict):
            raise CredentialsError(
                f'{source}: expected an object {{"<token>": {{"service": ..., "tenants": ...,'
                ' "scopes": [...]}, ...}')
        old = [(token, value) for token, value in document.items() if isinstance(value, str)]
        if old:
            raise CredentialsError(_migration_message(source, old))
        credentials: dict[str, Credential] = {}
        problems: list[str] = []
        for position, (token, value) in enumerate(document.items(), 1):
            where = _entry_name(position, value)
            if not token or token != token.strip() or any(c.isspace() for c in token):
                problems.append(f"{where}: a token must be non-empty, without blanks")
            try:
                credentials[token] = Credential.model_validate(value)
            except ValidationError as e:
                problems += [f"{where}: {'.'.join(str(p) for p in item['loc']) or 'entry'}: "
                             f"{item['msg'].removeprefix('Value error, ')}"
                             for item in e.errors()]
        if problems:
            raise CredentialsError(f"{source}:\n  " + "\n  ".join(problems))
        return cls(credentials)

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """Read and check a tokens file."""
        try:
            document = loads(path.read_bytes())
        except FileNotFoundError as e:
            raise CredentialsError(f"{path}: no such tokens file") from e
        except ValueError as e:
            raise CredentialsError(f"{path}: not JSON: {e}") from e
        return cls.parse(document, str(path))


def _entry_name(position: int, value: Any) -> str:
    """How an error names an entry: never by its token (a secret that would reach logs)."""
    service = value.get("service") if isinstance(value, dict) else None
    return f"entry {position}" + (f" (service {service!r})" if isinstance(service, str) else "")


def _migration_message(source: str, old: Iterable[tuple[str, str]]) -> str:
    lines = [
        f"{source} is in the old form (token -> service name), which let every token write "
        "for every tenant. Rewrite each entry in the new form. The entries below keep what "
        "the old form allowed; narrow \"tenants\" and \"scopes\" to what each service needs "
        f"(scopes: {', '.join(SCOPES)}):"]
    for _, service in old:
        entry = {"service": service, "tenants": ALL_TENANTS, "scopes": list(OLD_FORM_SCOPES)}
        lines.append(f'  "<the token of {service}>": {dumps(entry).decode()}')
    return "\n".join(lines)


def load_tokens(path: Path | None) -> Tokens:
    """The tokens of `path`; none (every request refused) when no file is configured."""
    return Tokens({}) if path is None else Tokens.load(path)


__all__ = ["ALL_TENANTS", "SCOPES", "SCOPE_MEANINGS", "Credential", "CredentialsError",
           "Denial", "Scope", "Tokens", "authorize", "load_tokens", "scope_to_publish"]
