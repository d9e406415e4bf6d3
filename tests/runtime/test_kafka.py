"""The shared Kafka client settings against the real broker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from runtime.settings import COMPRESSIONS, Settings, SettingsError
from tests.kafka_helpers import publish, read_records


@pytest.mark.parametrize("codec", COMPRESSIONS)
def test_every_codec_round_trips_through_the_broker(
    settings_factory: Callable[..., Settings], codec: str,
) -> None:
    settings = settings_factory(kafka_compression=codec)
    records = [(f"tenant-{i % 3}", b'{"n": %d, "pad": "%s"}' % (i, b"x" * (i * 37)))
               for i in range(200)]
    publish(settings, settings.topics.usage, records)
    got = read_records(settings, settings.topics.usage)
    assert sorted((r.key.decode(), r.value) for r in got) == sorted(records)


def test_an_unknown_codec_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="kafka_compression"):
        Settings.load({"TALLY_KAFKA_COMPRESSION": "brotli"})
