"""A one-line progress bar for long-running commands (stderr, redrawn in place)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, width: int = 30) -> None:
        self.label = label
        self.total = max(total, 1)
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self.interactive = sys.stderr.isatty()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        # On a terminal, redraw ten times a second; in a log, a line every five seconds.
        interval = 0.1 if self.interactive else 5.0
        if not force and now - self._last_draw < interval:
            return
        self._last_draw = now
        share = min(done / self.total, 1.0)
        filled = int(share * self.width)
        rate = done / max(now - self.started, 1e-6)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"{self.label:<22} [{bar}] {done:>8}/{self.total} {rate:>9,.0f}/s"
        sys.stderr.write(f"\r{line}" if self.interactive else f"{line}\n")
        sys.stderr.flush()

    def finish(self, done: int) -> None:
        self.update(done, force=True)
        if self.interactive:
            sys.stderr.write("\n")
