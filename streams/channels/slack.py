"""Slack-compatible incoming webhooks: `POST {"text": "<the notification's line>"}`.

Slack, Mattermost, Rocket.Chat, Discord's /slack endpoint and Teams' connectors take this
body. The webhook URL is the credential, so it is never logged or listed whole.
"""

from __future__ import annotations

import aiohttp

from schemas.codec import dumps
from schemas.records import Notification
from streams.channels.model import Channel, Refused
from streams.channels.posting import post
from streams.notifier import render_text


def slack_body(n: Notification) -> bytes:
    """The request body: Slack's `text` and nothing else (some receivers refuse more)."""
    return dumps({"text": render_text(n)})


class SlackSender:
    """Posts to Slack-compatible webhook channels."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def send(self, channel: Channel, n: Notification, attempt: int) -> Refused | None:
        return await post(self.http, channel.target, slack_body(n),
                          {"Content-Type": "application/json"})
