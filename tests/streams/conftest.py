"""Fixtures of the notifier tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.streams.notifier_support import ChatReceiver, serve_chat


@pytest.fixture
def chat() -> Iterator[ChatReceiver]:
    """A Slack-compatible webhook on 127.0.0.1 that records every POST."""
    yield from serve_chat()
