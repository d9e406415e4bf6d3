"""Errors of the producers package: one root, `ProducerError`, under `TallyError`."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.errors import TallyError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an event: where (`field`, dotted) and what (`message`)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ProducerError(TallyError):
    """Root of the producer SDK's and the ingest gateway's errors."""


class InvalidEventError(ProducerError, ValueError):
    """An event was refused at the call site; `problems` lists every problem, not the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("invalid event: " + "; ".join(str(p) for p in problems))


class PayloadTooLargeError(InvalidEventError):
    """The encoded event does not fit in one record under the configured byte bound."""


class ProducerClosedError(ProducerError):
    """The producer was closed (or not started); it accepts no more events."""


class ProducerUnavailableError(ProducerError):
    """The broker could not be reached and there is no spool to fall back on."""


class SpoolFullError(ProducerUnavailableError):
    """The spool holds its maximum and Kafka has not taken it back yet: the event was not
    taken (the caller still has it, and may retry later with the same id)."""


class DeliveryError(ProducerError):
    """Events could be neither delivered nor spooled (only possible without a spool)."""


class SpoolError(ProducerError):
    """The local spool could not be read or written."""
