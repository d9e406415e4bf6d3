"""Errors of the schemas package."""


class TallyError(Exception):
    """Root of every error Tally raises on purpose."""


class SchemaError(TallyError):
    """A record or document does not match its contract."""


class CatalogError(SchemaError):
    """A plan catalog file is invalid; the message lists every problem found."""
