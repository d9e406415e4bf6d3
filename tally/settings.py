"""Deprecated import path, kept for services written against it: `Settings` lives in
`runtime.settings` now (the floor every package stands on). Nothing in Tally imports this."""

from __future__ import annotations

import warnings

from runtime.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError"]

warnings.warn("tally.settings moved to runtime.settings; import Settings from there",
              DeprecationWarning, stacklevel=2)
