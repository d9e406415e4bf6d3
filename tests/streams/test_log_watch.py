"""The log watch (streams/log_watch.py): its judgement (a log whose start moved back, or
whose first record changed, is another log; one whose start moved forward is the same
one), and its loop, which only its own cancellation ends."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.settings import Settings
from streams.log_watch import LogWatch, Mark, Waiting, judge, mark_of, waiting

marks = st.builds(Mark, st.integers(0, 10**9), st.integers(0, 2**41), st.integers(0, 2**32 - 1))


def test_the_same_first_record_is_the_same_log() -> None:
    first = mark_of(0, 1_700_000_000_000, b"acme", b"frame")
    assert judge(first, mark_of(0, 1_700_000_000_000, b"acme", b"frame")) is None


def test_a_new_first_record_at_the_same_offset_is_another_log() -> None:
    before = mark_of(0, 1_700_000_000_000, b"acme", b"frame")
    assert judge(before, mark_of(0, 1_700_000_000_500, b"acme", b"frame")) is not None
    assert judge(before, mark_of(0, 1_700_000_000_000, b"acme", b"other")) is not None
    assert judge(before, mark_of(0, 1_700_000_000_000, b"globex", b"frame")) is not None


def test_a_start_moved_back_is_another_log() -> None:
    assert judge(Mark(120, 5, 7), Mark(0, 9, 7)) is not None


@given(marks, st.integers(1, 10**6), st.integers(0, 2**41), st.integers(0, 2**32 - 1))
def test_a_start_moved_forward_by_retention_is_the_same_log(
        before: Mark, gone: int, timestamp: int, checksum: int) -> None:
    assert judge(before, Mark(before.offset + gone, timestamp, checksum)) is None


@given(marks, marks)
def test_nothing_is_judged_without_both_marks(a: Mark, b: Mark) -> None:
    assert judge(None, a) is None
    assert judge(b, None) is None
    assert (judge(a, b) is None) == (b.offset > a.offset or a == b)


def test_a_position_behind_the_end_waits_from_when_it_last_moved() -> None:
    first = waiting(None, 10, 50, now=100.0)
    assert first == Waiting(10, 100.0)
    assert waiting(first, 10, 80, now=130.0) == Waiting(10, 100.0)  # stuck: still from 100
    assert waiting(first, 20, 80, now=130.0) == Waiting(20, 130.0)  # it moved: from now


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.floats(0, 1e6))
def test_a_position_at_or_past_the_reported_end_never_waits(
        position: int, short: int, now: float) -> None:
    # Tansu reports ends short of the last record: an end at or below the position is
    # taken for "nothing to read", never for a stall.
    end = max(0, position - short)
    assert waiting(Waiting(position, 0.0), position, end, now) is None


class _CheckCancelledFromInside(LogWatch):
    """A check that raises CancelledError once (as aiokafka's consumer did from `stop()`),
    then finds a lost log."""

    def __init__(self) -> None:
        super().__init__(Settings(), [], 0.0, self._lost, "usage", dict, 60.0)
        self.checks = 0
        self.lost: list[str] = []

    async def _lost(self, reason: str, what: str) -> None:
        self.lost.append(reason)

    async def check(self) -> tuple[str, str] | None:
        self.checks += 1
        if self.checks == 1:
            raise asyncio.CancelledError
        return "log_lost", "usage partition 0"


def test_a_cancelled_error_from_inside_a_check_does_not_end_the_watch() -> None:
    watch = _CheckCancelledFromInside()
    asyncio.run(asyncio.wait_for(watch.run(), 5))
    assert watch.checks == 2 and watch.lost == ["log_lost"]


class _SlowCheck(LogWatch):
    def __init__(self) -> None:
        super().__init__(Settings(), [], 0.0, _never, "usage", dict, 60.0)
        self.checking = asyncio.Event()

    async def check(self) -> tuple[str, str] | None:
        self.checking.set()
        await asyncio.sleep(3600)
        return None


def test_the_watch_still_stops_when_it_is_cancelled_during_a_check() -> None:
    async def cancel_a_watch() -> None:
        watch = _SlowCheck()
        task = asyncio.create_task(watch.run())
        await watch.checking.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(cancel_a_watch(), 5))


async def _never(reason: str, what: str) -> None:
    raise AssertionError("no check should find anything")
