"""Errors of the developer tooling."""

from schemas.errors import TallyError


class DevtoolsError(TallyError):
    """A developer command cannot run here (e.g. the test kit is not installed)."""
