"""What a notification channel is, what makes its target valid, and how a send can fail."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Literal, Protocol, get_args
from urllib.parse import urlsplit

from schemas.records import Notification

ChannelKind = Literal["email", "slack", "webhook"]
CHANNEL_KINDS: tuple[ChannelKind, ...] = get_args(ChannelKind)


@dataclass(frozen=True)
class Channel:
    """A row of `tally.notification_channels`."""

    channel_id: int
    tenant_id: str
    kind: ChannelKind
    target: str
    signing_secret: str | None
    enabled: bool
    created_at: datetime

    def shown(self) -> str:
        """The target as listings show it: webhook URLs are credentials (anyone holding a
        Slack webhook URL can post to the channel), so only their host and last characters
        are shown."""
        if self.kind == "email":
            return self.target
        parts = urlsplit(self.target)
        return f"{parts.scheme}://{parts.netloc}/...{self.target[-4:]}"


@dataclass(frozen=True)
class Refused:
    """One failed attempt at a delivery.

    `cause` is short and bounded ("http 503", "smtp 550", "network TimeoutError"): its first
    word labels the retry metric. `permanent`: retrying cannot change the answer, so the
    delivery goes to the dead letters at once. `retry_after`: seconds the receiver asked
    for before the next attempt.
    """

    cause: str
    permanent: bool = False
    retry_after: float | None = None


class Sender(Protocol):
    """Sends a notification to one kind of channel, once per call."""

    async def send(self, channel: Channel, n: Notification, attempt: int) -> Refused | None:
        """One attempt; None when the channel accepted it."""
        ...


def target_problems(kind: str, target: str) -> list[str]:
    """Everything wrong with `target` for a channel of `kind`; empty when it is valid.

    E-mail: one plain address (no display name, no list). Slack and webhook: an absolute
    https URL with a host and no user info; plain http only to a loopback address (a local
    receiver in development and tests).
    """
    if kind not in CHANNEL_KINDS:
        return [f"kind must be one of {', '.join(CHANNEL_KINDS)}, not {kind!r}"]
    if kind == "email":
        return _email_problems(target)
    return _url_problems(target)


def _email_problems(target: str) -> list[str]:
    if not target or any(c in target for c in " ,;<>\r\n\t"):
        return [f"{target!r} is not a single e-mail address"]
    try:
        address = Address(addr_spec=target)
    except (HeaderParseError, ValueError, IndexError) as e:
        return [f"{target!r} is not an e-mail address: {e}"]
    if not address.username or "." not in address.domain:
        return [f"{target!r} is not an e-mail address with a user and a domain"]
    return []


def _url_problems(target: str) -> list[str]:
    problems: list[str] = []
    try:
        parts = urlsplit(target)
        host = parts.hostname
    except ValueError as e:
        return [f"{target!r} is not a URL: {e}"]
    if not host:
        problems.append(f"{target!r} has no host")
    if parts.username is not None or parts.password is not None:
        problems.append("a URL with user info is refused (put credentials in the path)")
    if any(c in target for c in " \r\n\t"):
        problems.append("a URL cannot contain whitespace")
    if parts.scheme == "http":
        if host and not _loopback(host):
            problems.append("plain http is allowed only to a loopback address: use https")
    elif parts.scheme != "https":
        problems.append(f"{target!r} must be an https URL")
    return problems


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
