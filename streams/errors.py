"""Errors of the streams package."""

from schemas.errors import TallyError


class StreamsError(TallyError):
    """Root of the stream processor's errors."""


class StateRecoveryError(StreamsError):
    """A partition's state could not be read back from its changelog."""


class ChannelError(StreamsError):
    """A notification channel is invalid, or not there (`tally notify channels`)."""
