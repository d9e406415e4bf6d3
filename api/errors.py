"""The API's errors: each is an HTTP answer with a status and a one-line message."""

from __future__ import annotations

from typing import Any

from schemas.errors import TallyError


class ApiError(TallyError):
    """A request the API answers with `status` and `{"error": message, **detail}`."""

    status = 400
    headers: dict[str, str] | None = None

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class Unauthorized(ApiError):
    status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="tally"'}


class Forbidden(ApiError):
    """`detail["problems"]`: every rule the request breaks."""

    status = 403


class BadRequest(ApiError):
    status = 400


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class Unprocessable(ApiError):
    """A well-formed request that means nothing for what it names."""

    status = 422


class Unavailable(ApiError):
    """A dependency (Kafka, the catalog, Stripe) is not there yet or failed."""

    status = 503
