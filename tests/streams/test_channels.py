"""Customer alerts: tenants' e-mail, Slack and webhook channels, each delivery once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal as D
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiosmtpd.controller import Controller

from devtools.devstack import free_port
from runtime import kafka
from runtime.postgres import connect, migrate
from runtime.settings import Settings
from schemas.codec import dumps
from schemas.records import Notification
from streams.channels.delivery import ChannelDelivery, ChannelOptions
from streams.channels.mail import render_email, subject
from streams.channels.model import Channel, target_problems
from streams.channels.posting import answer, post
from streams.channels.slack import slack_body
from streams.channels.store import add_channel
from streams.notifier import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    Notifier,
    NotifierOptions,
    idempotency_key,
    render_text,
    verify_signature,
)
from tally.cli import main as tally_main
from tests.kafka_helpers import publish, wait_for
from tests.streams.notifier_support import ChatReceiver, NotifierProcess

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
SENDER = "Tally Alerts <alerts@tally.example>"


def notification(tenant: str = "t-1", kind: Any = "soft_limit", percent: str | None = "80",
                 used: str = "800", meter: str = "api_calls") -> Notification:
    return Notification(tenant_id=tenant, meter=meter, plan_id="free", period_start=PERIOD,
                        kind=kind, threshold_percent=None if percent is None else D(percent),
                        used=D(used), limit=D(1000))


def channel(kind: Any = "email", target: str = "alice@example.com", channel_id: int = 7,
            tenant: str = "t-1", secret: str | None = None) -> Channel:
    return Channel(channel_id, tenant, kind, target, secret, True, PERIOD)


# --- pure parts ---------------------------------------------------------------------------


def test_an_email_alert_has_a_plain_text_and_an_html_body() -> None:
    n = notification()
    msg = render_email(n, channel(), SENDER, now=PERIOD)
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    assert render_text(n) in plain.get_content()
    assert "Used:" in plain.get_content() and "800" in plain.get_content()
    assert "<table>" in html.get_content() and "80%" in html.get_content()
    assert msg["Subject"] == "[Tally] t-1: 80% of the included api_calls used"
    assert msg["To"] == "alice@example.com" and msg["From"] == SENDER
    assert msg["Auto-Submitted"] == "auto-generated"
    # The same on every attempt: mail systems can collapse a resend.
    assert msg["Message-ID"] == f"<{idempotency_key(n)}.7@tally.example>"
    assert render_email(n, channel(), SENDER)["Message-ID"] == msg["Message-ID"]


def test_a_tenant_id_cannot_add_headers_or_markup_to_an_email() -> None:
    n = notification(tenant="evil\r\nBcc: victim@example.com <b>")
    msg = render_email(n, channel(), SENDER)
    parsed = message_from_bytes(msg.as_bytes(), policy=policy.default)
    assert parsed["Bcc"] is None and parsed["To"] == "alice@example.com"
    assert "\n" not in str(msg["Subject"])
    html = msg.get_body(("html",))
    assert isinstance(html, EmailMessage)
    assert "&lt;b&gt;" in html.get_content() and "<b>" not in html.get_content()


@pytest.mark.parametrize(("kind", "percent", "expected"), [
    ("exceeded", None, "[Tally] t-1: included api_calls exceeded; overage applies"),
    ("blocked", None, "[Tally] t-1: hard limit of api_calls reached; usage blocked"),
    ("trial_ending", None, "[Tally] t-1: trial ends soon"),
])
def test_email_subjects_say_what_happened(kind: str, percent: str | None, expected: str) -> None:
    assert subject(notification(kind=kind, percent=percent)) == expected


def test_a_slack_alert_is_only_text() -> None:
    n = notification(kind="blocked", percent=None, used="1000")
    assert orjson.loads(slack_body(n)) == {"text": render_text(n)}


@pytest.mark.parametrize(("kind", "target", "valid"), [
    ("email", "alice@example.com", True),
    ("email", "Alice <alice@example.com>", False),
    ("email", "alice@example.com, bob@example.com", False),
    ("email", "alice", False),
    ("slack", "https://hooks.slack.com/services/T0/B0/x", True),
    ("slack", "http://hooks.slack.com/services/T0/B0/x", False),
    ("slack", "http://127.0.0.1:8080/hook", True),
    ("webhook", "https://user:pw@example.com/hook", False),
    ("webhook", "ftp://example.com/hook", False),
    ("webhook", "https:///no-host", False),
    ("sms", "+15550100", False),
])
def test_channel_targets_are_checked(kind: str, target: str, valid: bool) -> None:
    assert (target_problems(kind, target) == []) is valid


def test_listings_shorten_webhook_urls_which_are_credentials() -> None:
    slack = channel("slack", "https://hooks.slack.com/services/T0/B0/abcdefSECRET1234")
    assert slack.shown() == "https://hooks.slack.com/...1234"
    assert channel().shown() == "alice@example.com"


def test_what_an_http_answer_means_for_a_delivery() -> None:
    assert answer(204, None) is None
    assert answer(503, None) == answer(503, "x")  # retried, no usable Retry-After
    assert not answer(503, None).permanent  # type: ignore[union-attr]
    assert answer(404, None).permanent  # type: ignore[union-attr]  # revoked webhook
    assert answer(410, None).permanent  # type: ignore[union-attr]
    slow = answer(429, "7")
    assert slow is not None and not slow.permanent and slow.retry_after == 7
    assert not answer(302, None).permanent  # type: ignore[union-attr]


def test_a_channel_post_never_follows_a_redirect() -> None:
    internal: list[str] = []

    async def scenario() -> Any:
        inside = web.Application()

        async def reached(request: web.Request) -> web.Response:
            internal.append(request.path)
            return web.Response(status=204)

        inside.router.add_route("*", "/{tail:.*}", reached)
        async with TestServer(inside, host="127.0.0.1") as target:
            hook = web.Application()

            async def redirect(request: web.Request) -> web.Response:
                raise web.HTTPTemporaryRedirect(str(target.make_url("/admin")))

            hook.router.add_post("/hook", redirect)
            async with TestServer(hook, host="127.0.0.1") as receiver:
                import aiohttp

                async with aiohttp.ClientSession() as http:
                    return await post(http, str(receiver.make_url("/hook")), b"{}", {})

    refused = asyncio.run(scenario())
    assert refused is not None and refused.cause == "http 307"
    assert internal == []


# --- local receivers ----------------------------------------------------------------------


@dataclass
class Mailbox:
    """What a local SMTP server (aiosmtpd) received; refuses the addresses in `unknown`."""

    unknown: set[str] = field(default_factory=set)
    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.unknown:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 Message accepted for delivery"

    def subjects(self) -> list[str]:
        return sorted(str(m["Subject"]) for m in self.messages)


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield mailbox, port
    controller.stop()


def _with_mail(settings: Settings, port: int) -> Settings:
    return settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port,
                                       "smtp_starttls": False, "smtp_from": SENDER})


# --- the channels CLI ---------------------------------------------------------------------


def test_channels_are_added_listed_disabled_and_removed_with_the_cli(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    migrate(database_url)
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", database_url)

    def tally(*argv: str) -> tuple[int, str, str]:
        code = tally_main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    assert tally("notify", "channels", "add", "t-1", "email", "alice@example.com")[:2] == (
        0, "added channel 1: t-1 email alice@example.com\n")
    hook = "https://hooks.slack.com/services/T0/B0/abcdefSECRET1234"
    assert tally("notify", "channels", "add", "t-1", "slack", hook)[1] == (
        "added channel 2: t-1 slack https://hooks.slack.com/...1234\n")
    code, out, _ = tally("notify", "channels", "add", "t-2", "webhook", "https://t2.example/h")
    secret = out.splitlines()[1].rsplit(" ", 1)[1]
    assert code == 0 and out.startswith("added channel 3") and len(secret) >= 40
    # Again: the existing channel, no second row, no new secret.
    assert tally("notify", "channels", "add", "t-1", "email", "alice@example.com")[1] == (
        "channel 1 exists: t-1 email alice@example.com\n")
    assert tally("notify", "channels", "disable", "1")[0] == 0
    code, out, _ = tally("notify", "channels", "list", "--tenant", "t-1")
    assert [line.split() for line in out.splitlines()] == [
        ["1", "t-1", "email", "disabled", "alice@example.com"],
        ["2", "t-1", "slack", "enabled", "https://hooks.slack.com/...1234"]]
    assert "SECRET" not in tally("notify", "channels", "list")[1]
    assert tally("notify", "channels", "remove", "2")[0] == 0
    assert len(tally("notify", "channels", "list")[1].splitlines()) == 2
    code, _, err = tally("notify", "channels", "add", "t-1", "slack", "http://hooks.example/x")
    assert code == 2 and err == ("tally: error: cannot add a slack channel: plain http is "
                                 "allowed only to a loopback address: use https\n")
    assert tally("notify", "channels", "remove", "99")[2] == (
        "tally: error: no notification channel 99\n")
    with connect(database_url) as conn:
        stored = conn.execute("SELECT signing_secret FROM tally.notification_channels"
                              " WHERE channel_id = 3").fetchone()
    assert stored == (secret,)


# --- on the real broker and Postgres ------------------------------------------------------


def _delivering(settings: Settings, channels: ChannelDelivery,
                until: Callable[[], bool]) -> None:
    """Run a notifier with `channels` (no operator webhook) until `until()` holds."""

    async def run() -> None:
        notifier = Notifier(settings, NotifierOptions("", ""), channels)
        task = asyncio.create_task(notifier.run())
        deadline = time.monotonic() + 60
        while not until() and not task.done():
            assert time.monotonic() < deadline, (
                f"delivered {channels.delivered}, dead {channels.dead_letters}, "
                f"last error {channels.last_error}")
            await asyncio.sleep(0.05)
        notifier.stop()
        await task

    asyncio.run(run())


def test_refused_and_failing_deliveries_go_to_the_dead_letters_and_hold_up_nothing_else(
    settings_factory: Callable[..., Settings], database_url: str,
    smtp_server: tuple[Mailbox, int], chat: ChatReceiver,
) -> None:
    mailbox, smtp_port = smtp_server
    mailbox.unknown = {"gone@example.com"}
    chat.refuse = {"/down": 503, "/revoked": 404}
    migrate(database_url)
    settings = _with_mail(settings_factory(database_url=database_url), smtp_port)
    with connect(database_url) as conn:
        for tenant, kind, target in [("t-1", "email", "gone@example.com"),
                                     ("t-1", "slack", chat.url("/down")),
                                     ("t-1", "slack", chat.url("/revoked")),
                                     ("t-1", "email", "ok@example.com")]:
            add_channel(conn, tenant, kind, target)
        hook, _ = add_channel(conn, "t-2", "webhook", chat.url("/t2"))
    n1, n2 = notification("t-1"), notification("t-2", kind="exceeded", percent=None)
    publish(settings, settings.topics.notifications,
            [("t-1", dumps(n1)), ("t-2", dumps(n2))])
    channels = ChannelDelivery(settings, ChannelOptions(max_attempts=3, backoff_base=0.01))

    _delivering(settings, channels, lambda: channels.delivered + channels.dead_letters == 5)

    assert mailbox.subjects() == [subject(n1)]
    assert [str(m["To"]) for m in mailbox.messages] == ["ok@example.com"]
    # The tenant's own webhook: signed with its channel's secret, keyed by the identity.
    [(_, headers, body)] = [p for p in chat.posts if p[0] == "/t2"]
    assert hook.signing_secret is not None
    assert verify_signature(hook.signing_secret, body, headers[SIGNATURE_HEADER])
    assert headers[IDEMPOTENCY_HEADER] == idempotency_key(n2)
    assert len([p for p in chat.posts if p[0] == "/down"]) == 3  # max_attempts
    assert len([p for p in chat.posts if p[0] == "/revoked"]) == 1  # refused for good
    with psycopg.connect(database_url) as conn:
        dead = conn.execute(
            "SELECT c.target, d.reason, d.attempts, d.last_error, d.notification->>'kind'"
            " FROM tally.notification_dead_letters d JOIN tally.notification_channels c"
            " USING (channel_id) ORDER BY c.channel_id").fetchall()
        delivered = conn.execute("SELECT count(*) FROM tally.notification_deliveries").fetchone()
    assert dead == [
        ("gone@example.com", "refused", 1, "smtp 550 recipient refused", "soft_limit"),
        (chat.url("/down"), "attempts_exhausted", 3, "http 503", "soft_limit"),
        (chat.url("/revoked"), "refused", 1, "http 404", "soft_limit"),
    ]
    assert delivered == (2,)


def _reset_group(settings: Settings, group_id: str) -> None:
    """Commit offset 0 on every partition of tally.notifications for the notifier's group:
    the next notifier replays the topic, as after offsets lost or a crash before commit."""

    async def reset() -> None:
        # As a member of the group: the broker refuses commits from outside it.
        consumer = kafka.consumer(settings, settings.topics.notifications, group_id=group_id,
                                  session_timeout_ms=4000, heartbeat_interval_ms=500)
        await consumer.start()
        try:
            deadline = time.monotonic() + 30
            while len(consumer.assignment()) < settings.partitions:
                assert time.monotonic() < deadline, "no assignment"
                await consumer.getmany(timeout_ms=100)
            await consumer.commit(dict.fromkeys(consumer.assignment(), 0))
        finally:
            await consumer.stop()

    asyncio.run(reset())


def test_email_and_chat_alerts_are_delivered_exactly_once_across_a_notifier_restart(
    settings_factory: Callable[..., Settings], database_url: str, tmp_path: Path,
    smtp_server: tuple[Mailbox, int], chat: ChatReceiver, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mailbox, smtp_port = smtp_server
    migrate(database_url)
    settings = _with_mail(settings_factory(database_url=database_url), smtp_port)
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", database_url)
    for argv in (["t-1", "email", "alice@example.com"], ["t-1", "slack", chat.url("/t1")],
                 ["t-2", "slack", chat.url("/t2")]):
        assert tally_main(["notify", "channels", "add", *argv]) == 0
    capsys.readouterr()
    first = [notification("t-1"), notification("t-1", kind="blocked", percent=None),
             notification("t-2")]
    publish(settings, settings.topics.notifications, [(n.tenant_id, dumps(n)) for n in first])

    notifier = NotifierProcess(settings, tmp_path / "notifier-1.log")
    wait_for(lambda: (len(mailbox.messages), len(chat.posts)), lambda got: got == (2, 3),
             what="two e-mails and three chat messages")
    assert notifier.stop() == 0

    # The restarted notifier reads every notification again, and one new one.
    _reset_group(settings, f"{settings.topic_prefix}notifier")
    later = notification("t-1", kind="exceeded", percent=None)
    publish(settings, settings.topics.notifications, [("t-1", dumps(later))])
    restarted = NotifierProcess(settings, tmp_path / "notifier-2.log")
    wait_for(lambda: restarted.metric("tally_notifier_channel_duplicates_total"),
             lambda seen: seen == 5, what="the five replayed deliveries recognised")
    wait_for(lambda: (len(mailbox.messages), len(chat.posts)), lambda got: got == (3, 4),
             what="the new notification by e-mail and chat")
    assert restarted.stop() == 0

    t1 = [n for n in [*first, later] if n.tenant_id == "t-1"]
    assert mailbox.subjects() == sorted(subject(n) for n in t1)
    assert all(str(m["To"]) == "alice@example.com" for m in mailbox.messages)
    assert chat.texts("/t1") == sorted(render_text(n) for n in t1)
    assert chat.texts("/t2") == [render_text(first[2])]
    for m in mailbox.messages:
        assert m.get_body(("plain",)) is not None and m.get_body(("html",)) is not None
    with connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM tally.notification_deliveries"
                            ).fetchone() == (7,)
