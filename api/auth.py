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

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from runtime.credentials import ALL_TENANTS, Credential, Denial, Scope, Tokens, authorize

BEARER = HTTPBearer(auto_error=False, description="A token of the tokens file "
                    "(TALLY_TOKENS_FILE): its tenants and scopes decide what it may see")


class Forbidden(HTTPException):
    """403 with every rule the request breaks."""

    def __init__(self, denials: tuple[Denial, ...]) -> None:
        super().__init__(403, {"error": "forbidden",
                               "problems": [d.to_json() for d in denials]})


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
        raise Forbidden(first)

    def require_read(self, tenant: str) -> None:
        self.require(tenant, "read", "admin")

    def require_admin(self) -> None:
        if "admin" not in self.credential.scopes:
            self.require(ALL_TENANTS, "admin")  # raises: names the missing scope

    @property
    def tenants(self) -> frozenset[str] | None:
        """The tenants this token acts for; None for every tenant."""
        t = self.credential.tenants
        return None if t == ALL_TENANTS else frozenset(t)


def tokens_of(request: Request) -> Tokens:
    tokens: Tokens = request.app.state.tokens
    return tokens


def caller(request: Request,
           bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> Caller:
    """The request's caller; 401 without a known bearer token."""
    credential = None
    if bearer is not None:
        credential = tokens_of(request).lookup(bearer.credentials)
    if credential is None:
        raise HTTPException(401, {"error": "missing or unknown bearer token"},
                            headers={"WWW-Authenticate": 'Bearer realm="tally"'})
    return Caller(credential)


CallerDep = Annotated[Caller, Depends(caller)]
