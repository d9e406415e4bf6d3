"""A tenant's own webhook: the notifier's signed request (streams/notifier.py describes it
and how to verify it), signed with the channel's own secret, so no tenant can forge
another's notifications."""

from __future__ import annotations

import time

import aiohttp

from schemas.records import Notification
from streams.channels.model import Channel, Refused
from streams.channels.posting import post
from streams.notifier import (
    ATTEMPT_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    idempotency_key,
    payload,
    sign,
)


class WebhookSender:
    """Posts signed notifications to tenants' webhook channels."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def send(self, channel: Channel, n: Notification, attempt: int) -> Refused | None:
        assert channel.signing_secret is not None  # the table's CHECK
        body = payload(n)
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: idempotency_key(n),
            SIGNATURE_HEADER: sign(channel.signing_secret, body, int(time.time())),
            ATTEMPT_HEADER: str(attempt),
        }
        return await post(self.http, channel.target, body, headers)
