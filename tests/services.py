"""Tally services run inside a test process, stopped the way SIGTERM stops them."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from projections.projector import Projector
from runtime.postgres import migrate
from runtime.settings import Settings


class ProjectorThread:
    """The projector in a thread with its own event loop, stopped as on SIGTERM."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        migrate(settings.require_database())  # `tally db migrate`, before tests query
        self.projector = Projector(settings, **options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.projector.run())
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.projector.stop)
        self.thread.join(30)
        assert not self.thread.is_alive(), "projector did not stop"
        if self.error:
            raise self.error

    def __enter__(self) -> ProjectorThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
