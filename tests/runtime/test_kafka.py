"""The shared Kafka client settings against the real broker."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import faust
import pytest
from aiokafka.errors import KafkaError

from runtime import kafka
from runtime.settings import COMPRESSIONS, Settings, SettingsError
from streams.app import create_app
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


def test_a_consumer_stops_cleanly_right_after_it_started(
    settings_factory: Callable[..., Settings],
) -> None:
    """aiokafka's own consumer raises CancelledError from a stop() right after start()
    (runtime/kafka.py, _Consumer); the worker's log watch died of it without a word."""
    settings = settings_factory()

    async def start_and_stop() -> None:
        consumer = kafka.consumer(settings)
        await consumer.start()
        await consumer.stop()

    asyncio.run(start_and_stop())  # no CancelledError


def test_an_unknown_codec_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="kafka_compression"):
        Settings.load({"TALLY_KAFKA_COMPRESSION": "brotli"})


# --- production clusters: TLS and SASL -------------------------------------------------------


def test_sasl_without_credentials_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="TALLY_KAFKA_SASL_USERNAME"):
        Settings.load({"KAFKA_BOOTSTRAP_SERVERS": "kafka:9093",
                       "TALLY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})


def test_every_client_gets_the_clusters_tls_and_sasl() -> None:
    settings = Settings.load({
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9093", "TALLY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "TALLY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "TALLY_KAFKA_SASL_USERNAME": "tally",
        "TALLY_KAFKA_SASL_PASSWORD": "s3cret"})
    options = kafka.connection(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert (options["sasl_mechanism"], options["sasl_plain_username"],
            options["sasl_plain_password"]) == ("SCRAM-SHA-512", "tally", "s3cret")
    credentials = create_app(settings, web_port=6099).conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == (
        "SASL_SSL", "SCRAM-SHA-512")


def test_plaintext_is_the_default_and_carries_no_tls() -> None:
    settings = Settings.load({"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"})
    options = kafka.connection(settings)
    assert (options["security_protocol"], options["ssl_context"]) == ("PLAINTEXT", None)
    assert "sasl_mechanism" not in options
    assert create_app(settings, web_port=6099).conf.broker_credentials is None


def test_a_tls_client_speaks_tls_on_the_wire(settings_factory: Callable[..., Settings]) -> None:
    """The settings reach the real client: TLS against the plaintext dev broker fails its
    handshake instead of connecting."""
    plaintext = settings_factory()
    settings = plaintext.model_copy(update={"kafka_security_protocol": "SSL"})

    async def start() -> None:
        producer = kafka.producer(settings, request_timeout_ms=3000)
        try:
            await producer.start()
        finally:
            await producer.stop()

    with pytest.raises(KafkaError):
        asyncio.run(start())
