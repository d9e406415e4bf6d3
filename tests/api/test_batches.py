"""Which queued consumes are decided together (`api.entitlements._take_batch`): at most
one use per key and one per event id, first come first, the rest left queued in order;
and every queued use finds a decider."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from api.entitlements import Decision, Entitlements, _take_batch, _Use
from domain.meters import KINDS
from domain.periods import calendar_month
from schemas.plans import default_catalog_path, load_catalog

CATALOG = load_catalog(default_catalog_path())
LOOP = asyncio.new_event_loop()  # the futures' loop; none of them is awaited


NOW = datetime(2026, 12, 7, tzinfo=UTC)


def teardown_module() -> None:
    LOOP.close()


def use(tenant: str, meter: str, event_id: str, cancelled: bool = False) -> _Use:
    done = LOOP.create_future()
    if cancelled:
        done.cancel()
    return _Use(tenant, meter, Decimal(1), event_id, None, KINDS["sum"], CATALOG, done)


def decision(use: _Use) -> Decision:
    return Decision(use.tenant, use.meter, use.quantity, True, "ok", Decimal(0), None, None,
                    "free", calendar_month(NOW), use.event_id)


def test_a_key_or_an_id_already_in_the_batch_waits_for_the_next() -> None:
    queue = [use("a", "api_calls", "1"), use("a", "api_calls", "2"),  # same key
             use("a", "tokens", "1"),  # same id
             use("b", "api_calls", "1"),  # another tenant's id 1: its own
             use("a", "tokens", "3")]
    first = queue[:]
    batch = _take_batch(queue, 64)
    assert batch == [first[0], first[3], first[4]]
    assert queue == [first[1], first[2]]
    assert _take_batch(queue, 64) == [first[1], first[2]] and queue == []


def test_a_batch_holds_at_most_the_limit_and_drops_the_cancelled() -> None:
    queue = [use("t", "api_calls", "x", cancelled=True)] + [
        use(f"t{i}", "api_calls", "x") for i in range(5)]
    first = queue[:]
    assert _take_batch(queue, 3) == first[1:4]
    assert queue == first[4:]


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["api_calls", "tokens"]),
                          st.sampled_from("123"), st.booleans()), max_size=30),
       st.integers(1, 8))
def test_every_queued_use_is_batched_once_in_order_and_no_batch_repeats_a_key_or_id(
        uses: list[tuple[str, str, str, bool]], limit: int) -> None:
    queue = [use(*u) for u in uses]
    live = [u for u in queue if not u.done.done()]
    batches = []
    while batch := _take_batch(queue, limit):
        batches.append(batch)
        assert len(batch) <= limit
        assert len({(u.tenant, u.meter) for u in batch}) == len(batch)
        assert len({(u.tenant, u.event_id) for u in batch}) == len(batch)
    assert queue == []
    assert sorted(map(id, (u for b in batches for u in b))) == sorted(map(id, live))
    for batch in batches:  # first come first within a batch
        assert [live.index(u) for u in batch] == sorted(live.index(u) for u in batch)


def test_a_use_queued_as_the_last_deciders_leave_is_still_decided() -> None:
    # Four consumes start four deciders; the first takes all four uses and every decider
    # then finds the queue empty, in one loop turn. A fifth consume in that same turn must
    # not count them as running (it would wait for ever with none left to take its use).
    async def run() -> None:
        decided: list[str] = []

        async def decide_batch(batch: list[_Use]) -> list[tuple[Decision, datetime]]:
            decided.extend(use.tenant for use in batch)  # no await: done in one step
            return [(decision(use), NOW) for use in batch]

        async def publish(*_: object) -> None:
            return None

        owner = Entitlements(lambda: None, publish, lambda: CATALOG, lambda: NOW)
        owner._decide_batch = decide_batch  # type: ignore[method-assign]
        first = [asyncio.create_task(owner.consume(f"t{n}", "api_calls", Decimal(1), "e", {}))
                 for n in range(4)]
        await asyncio.sleep(0)  # the four are queued, four deciders created
        fifth = asyncio.create_task(owner.consume("t5", "api_calls", Decimal(1), "e", {}))
        await asyncio.wait_for(asyncio.gather(*first, fifth), timeout=5)
        assert sorted(decided) == ["t0", "t1", "t2", "t3", "t5"]

    asyncio.run(run())
