"""Errors of the projections package."""

from schemas.errors import TallyError


class ProjectionError(TallyError):
    """Root of the projections' errors."""

