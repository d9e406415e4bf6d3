"""Errors in Stripe's JSON shape, and the response every request ends in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["JSON", "ApiError", "Response", "missing", "no_such", "unsupported"]

JSON = dict[str, Any]
"""A Stripe object or request body as decoded JSON / parsed form data."""

_DOC_URL: Final = "https://stripe.com/docs/error-codes"


class ApiError(Exception):
    """An error response in Stripe's JSON shape, raised anywhere below the HTTP layer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.should_retry = should_retry

    def response(self) -> Response:
        error: JSON = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"{_DOC_URL}/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        headers = {}
        if self.should_retry is not None:
            headers["Stripe-Should-Retry"] = "true" if self.should_retry else "false"
        return Response(self.status, {"error": error}, headers)


def missing(param: str) -> ApiError:
    return ApiError(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def no_such(kind: str, object_id: str, param: str, status: int = 400) -> ApiError:
    return ApiError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def unsupported(param: str) -> ApiError:
    return ApiError(
        400,
        f"The Stripe double does not model `{param}`; Tally should not "
        "need it (extend testkit/stripe_testkit if it does).",
        param=param,
    )


@dataclass(frozen=True)
class Response:
    """An answer: HTTP status, JSON body, headers beyond the standard ones."""

    status: int
    body: JSON
    headers: Mapping[str, str] = field(default_factory=dict)
