"""Who is asking: bearer tokens from the tokens file (runtime/credentials.py), checked the
same way as on every other Tally server.

- No token, or one the file does not know: 401.
- A token that may not act for the tenant asked about, or lacks the scope: 403 naming
  every rule broken (`authorize`). A tenant's data needs `read` or `admin`; the admin
  views need `admin` (and answer only about the tenants the token acts for: `"*"` for all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import Forbidden, Unauthorized
from runtime.credentials import (
    ALL_TENANTS,
    SCOPE_MEANINGS,
    Credential,
    Denial,
    Scope,
    Tokens,
    authorize,
)

BEARER = HTTPBearer(auto_error=False, description="A token of the tokens file "
                    "(TALLY_TOKENS_FILE): its tenants and scopes decide what it may see")


def forbidden(denials: tuple[Denial, ...]) -> Forbidden:
    """403 with every rule the request breaks."""
    return Forbidden("forbidden", problems=[d.to_json() for d in denials])


@dataclass(frozen=True)
class Caller:
    """The credential of the request's bearer token."""

    credential: Credential

    def require(self, tenant: str, *scopes: Scope) -> None:
        """Allow when the token acts for `tenant` with any of `scopes`; else 403 naming the
        rules the first scope breaks."""
        first: tuple[Denial, ...] = ()
        for scope in scopes:
            denials = authorize(self.credential, tenant, scope)
            if not denials:
                return
            first = first or denials
        raise forbidden(first)

    def require_read(self, tenant: str) -> None:
        self.require(tenant, "read", "admin")

    def require_admin(self) -> None:
        if "admin" not in self.credential.scopes:
            raise forbidden((Denial("scope_missing", "scope missing: 'admin' is needed to "
                                    f"{SCOPE_MEANINGS['admin']}"),))

    @property
    def tenants(self) -> frozenset[str] | None:
        """The tenants this token acts for; None for every tenant."""
        t = self.credential.tenants
        return None if t == ALL_TENANTS else frozenset(t)


def tokens_of(request: Request) -> Tokens:
    tokens: Tokens = request.app.state.tokens
    return tokens


async def caller(request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None,
                                                    Depends(BEARER)]) -> Caller:
    """The request's caller; 401 without a known bearer token. (Async, as every
    dependency here that does no blocking I/O: FastAPI runs a plain function in its thread
    pool, two thread hops per request for nothing.)"""
    credential = None
    if bearer is not None:
        credential = tokens_of(request).lookup(bearer.credentials)
    if credential is None:
        raise Unauthorized("missing or unknown bearer token")
    return Caller(credential)


CallerDep = Annotated[Caller, Depends(caller)]
