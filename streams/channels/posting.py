"""One HTTP POST to a channel's URL and what its answer means (Slack and webhook channels).

Redirects are never followed: the receiver would choose where the request goes, and a 3xx
pointing at an internal address would reach services the notifier can see and the
receiver cannot. A 3xx is a failed attempt like any other non-2xx.
"""

from __future__ import annotations

import aiohttp

from streams.channels.model import Refused

# Client errors that a retry cannot turn into a success: the request is wrong, the
# credentials (a Slack webhook URL is one) are revoked, or the endpoint is gone. 408
# (timeout), 409, 425 and 429 (slow down) are worth retrying.
_RETRYABLE_4XX = {408, 409, 425, 429}


def answer(status: int, retry_after: str | None) -> Refused | None:
    """What a response status means for the delivery; None for success (2xx)."""
    if 200 <= status < 300:
        return None
    permanent = 400 <= status < 500 and status not in _RETRYABLE_4XX
    return Refused(f"http {status}", permanent=permanent, retry_after=_seconds(retry_after))


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds (an HTTP date is not used by the receivers that matter)."""
    if retry_after is None:
        return None
    try:
        value = float(retry_after.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


async def post(http: aiohttp.ClientSession, url: str, body: bytes,
               headers: dict[str, str]) -> Refused | None:
    """POST `body` once; None when the receiver answered 2xx."""
    try:
        async with http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            return answer(resp.status, resp.headers.get("Retry-After"))
    except (aiohttp.ClientError, TimeoutError) as e:
        return Refused(f"network {type(e).__name__}")
