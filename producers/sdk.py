"""Deprecated import path, kept for services written against it: the producer SDK's public
API is the `producers` package (`from producers import UsageProducer, ProducerOptions`)."""

from __future__ import annotations

import warnings

from producers import ProducerOptions, SyncUsageProducer, UsageProducer

__all__ = ["ProducerOptions", "SyncUsageProducer", "UsageProducer"]

warnings.warn("producers.sdk is now the producers package; import from `producers`",
              DeprecationWarning, stacklevel=2)
