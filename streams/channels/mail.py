"""E-mail channels: a notification as a message with a plain-text and an HTML body, sent
over SMTP (settings `smtp_*`) with the standard library's smtplib, in a thread.

The connection is upgraded with STARTTLS (certificate verified against the system's CAs)
before logging in or sending, unless `smtp_starttls` is off. Each message has a Message-ID
made of the notification's identity and the channel, the same on every attempt, so mail
systems that collapse duplicates by Message-ID do so for a resend; `Auto-Submitted:
auto-generated` (RFC 3834) keeps auto-responders from answering it.
"""

from __future__ import annotations

import asyncio
import html
import smtplib
import ssl
from datetime import UTC, datetime
from decimal import Decimal
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

from runtime.settings import Settings
from schemas.records import Notification
from streams.channels.model import Channel, Refused
from streams.notifier import idempotency_key, render_text

# SMTP replies that mean this message will never be taken by this server, whatever the
# retry: no such mailbox, mailbox not allowed or name invalid, content refused.
_PERMANENT_REPLIES = {550, 551, 552, 553, 554}


def _one_line(text: str) -> str:
    """Header text without line breaks (a tenant id or meter name cannot add headers)."""
    return " ".join(text.split())


def _plain(value: Decimal | None) -> str:
    return "-" if value is None else format(value.normalize(), "f")


def subject(n: Notification) -> str:
    """The subject line: what happened to which meter of which tenant."""
    if n.kind == "soft_limit":
        what = f"{_plain(n.threshold_percent)}% of the included {n.meter} used"
    elif n.kind == "exceeded":
        what = f"included {n.meter} exceeded; overage applies"
    elif n.kind == "blocked":
        what = f"hard limit of {n.meter} reached; usage blocked"
    else:
        what = "trial ends soon"
    return _one_line(f"[Tally] {n.tenant_id}: {what}")


def _facts(n: Notification) -> list[tuple[str, str]]:
    facts = [("Tenant", n.tenant_id), ("Plan", n.plan_id), ("Meter", n.meter),
             ("Period from", n.period_start.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")),
             ("Used", _plain(n.used)), ("Limit", _plain(n.limit))]
    if n.threshold_percent is not None:
        facts.append(("Threshold", f"{_plain(n.threshold_percent)}%"))
    return facts


def render_email(n: Notification, channel: Channel, sender: str,
                 now: datetime | None = None) -> EmailMessage:
    """The message for one e-mail channel: multipart/alternative, plain text then HTML."""
    headline = render_text(n)
    facts = _facts(n)
    footer = (f"You receive this because {channel.target} is a notification channel of "
              f"tenant {n.tenant_id} in Tally.")
    width = max(len(label) for label, _ in facts) + 2
    plain = "\n".join([headline, "", *(f"{label + ':':<{width}}{value}" for label, value in facts),
                       "", footer, ""])
    rows = "".join(f"<tr><th align=\"left\">{html.escape(label)}</th>"
                   f"<td>{html.escape(value)}</td></tr>" for label, value in facts)
    body_html = (f"<!DOCTYPE html><html><body><p><strong>{html.escape(headline)}</strong></p>"
                 f"<table>{rows}</table><p><small>{html.escape(footer)}</small></p>"
                 f"</body></html>\n")
    domain = parseaddr(sender)[1].rpartition("@")[2] or "tally.invalid"
    msg = EmailMessage()
    msg["Subject"] = subject(n)
    msg["From"] = sender
    msg["To"] = channel.target
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = f"<{idempotency_key(n)}.{channel.channel_id}@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Tally-Notification"] = idempotency_key(n)
    msg.set_content(plain)
    msg.add_alternative(body_html, subtype="html")
    return msg


class MailSender:
    """Sends e-mail channels through the configured SMTP server, one connection per send."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.user = settings.smtp_user
        self.password = settings.smtp_password or ""
        self.sender = settings.smtp_from
        self.starttls = settings.smtp_starttls
        self.timeout = timeout

    async def send(self, channel: Channel, n: Notification, attempt: int) -> Refused | None:
        if not self.host:
            return Refused("smtp not configured (TALLY_SMTP_HOST)", permanent=True)
        message = render_email(n, channel, self.sender)
        return await asyncio.to_thread(self._send, message, channel.target)

    def _send(self, message: EmailMessage, to: str) -> Refused | None:
        assert self.host is not None
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                smtp.ehlo()
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                    smtp.ehlo()
                if self.user:
                    smtp.login(self.user, self.password)
                smtp.send_message(message, from_addr=parseaddr(self.sender)[1], to_addrs=[to])
            return None
        except smtplib.SMTPRecipientsRefused as e:
            code = min(code for code, _ in e.recipients.values())
            return Refused(f"smtp {code} recipient refused", permanent=code in _PERMANENT_REPLIES)
        except smtplib.SMTPDataError as e:
            return Refused(f"smtp {e.smtp_code} message refused",
                           permanent=e.smtp_code in _PERMANENT_REPLIES)
        except smtplib.SMTPResponseException as e:  # connect, sender, authentication
            return Refused(f"smtp {e.smtp_code} {type(e).__name__}")
        except (smtplib.SMTPException, OSError) as e:  # TLS, timeouts, refused connections
            return Refused(f"network {type(e).__name__}")
