"""Errors of the pure domain rules."""

from schemas.errors import TallyError


class DomainError(TallyError):
    """Root of the domain rules' errors."""
