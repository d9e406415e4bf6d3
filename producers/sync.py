"""`SyncUsageProducer`: the blocking facade of the producer SDK."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from producers.encoding import SubscriptionKind
from producers.options import ProducerOptions
from producers.producer import UsageProducer
from runtime.settings import Settings

T = TypeVar("T")


class SyncUsageProducer:
    """A blocking facade over UsageProducer, for code without an event loop.

    Runs the async producer on a private event-loop thread; each call blocks until the
    async call returns. For throughput, prefer the async API.
    """

    def __init__(self, settings: Settings, options: ProducerOptions | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tally-producer", daemon=True
        )
        self._thread.start()
        self._producer = UsageProducer(settings, options)
        try:
            self._call(self._producer.start())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncUsageProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def record(
        self, tenant: str, meter: str, quantity: int | float | Decimal | str, *,
        dimensions: Mapping[str, str] | None = None, event_id: str | None = None,
        time: datetime | None = None,
    ) -> None:
        """See UsageProducer.record."""
        self._call(self._producer.record(
            tenant, meter, quantity, dimensions=dimensions, event_id=event_id, time=time
        ))

    def subscription_event(
        self, kind: SubscriptionKind, tenant: str, plan_id: str, period_start: datetime,
        period_end: datetime, **optional: Any,
    ) -> None:
        """See UsageProducer.subscription_event (the four helpers are shorthands of it)."""
        self._call(self._producer.subscription_event(
            kind, tenant, plan_id, period_start, period_end, **optional
        ))

    def subscription_created(self, tenant: str, plan_id: str, period_start: datetime,
                             period_end: datetime, **optional: Any) -> None:
        """See UsageProducer.subscription_created."""
        self.subscription_event("created", tenant, plan_id, period_start, period_end, **optional)

    def subscription_plan_changed(self, tenant: str, plan_id: str, period_start: datetime,
                                  period_end: datetime, **optional: Any) -> None:
        """See UsageProducer.subscription_plan_changed."""
        self.subscription_event(
            "plan_changed", tenant, plan_id, period_start, period_end, **optional
        )

    def subscription_canceled(self, tenant: str, plan_id: str, period_start: datetime,
                              period_end: datetime, **optional: Any) -> None:
        """See UsageProducer.subscription_canceled."""
        self.subscription_event("canceled", tenant, plan_id, period_start, period_end, **optional)

    def subscription_renewed(self, tenant: str, plan_id: str, period_start: datetime,
                             period_end: datetime, **optional: Any) -> None:
        """See UsageProducer.subscription_renewed."""
        self.subscription_event("renewed", tenant, plan_id, period_start, period_end, **optional)

    def flush(self, timeout: float | None = None) -> None:
        """See UsageProducer.flush."""
        self._call(self._producer.flush(timeout))

    def close(self, timeout: float | None = None) -> None:
        """See UsageProducer.close; also stops the loop thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._producer.close(timeout))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
