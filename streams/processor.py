"""The worker's decisions for the tenants one partition owns (pure: no Kafka, no clock).

`PartitionProcessor` folds usage and subscription records into counters and decides, for
every event, whether it counts, in which period and under which plan, or why it cannot be
counted (a dead letter). The adapter (`streams/app.py`) feeds it records, writes the
effects it drains, and only then acknowledges the records. What a subscription event does
to a tenant's subscription is in streams/subscriptions.py; the reasons and text of dead
letters in streams/dead_letters.py.

A processor owns the tenants `runtime.kafka.owner_partition` maps to its partition,
whatever source partition their records come from (docs/architecture.md, "Partition
ownership"): the state of records from the partition of its own number (HOME) is kept as
when it read only that one; other source partitions' is kept apart per partition.

Exactly-once effect over at-least-once delivery rests on two facts kept here:
1. a counter remembers the last source offset folded into it, so a replayed record is
   not folded twice (`Counter.applied_offset` for the home partition,
   `Counter.applied_from` per other source partition; subscriptions alike);
2. the dedup window remembers the offset that first carried each id (its low 32 bits,
   mixed with the source partition for other partitions' records: `dedup.source_tag`),
   so a replayed record is told apart from a genuine duplicate (`DedupWindow`).
Both are persisted in the worker's changelog before the source offsets are committed.

"Now" is the source record's timestamp (ingestion time), never the wall clock, so a replay
of the same log makes the same decisions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError

from domain import quota, trials
from domain.aggregation import Counter
from domain.periods import Period, anniversary_period, calendar_month
from schemas.codec import RecordDecodeError, decode_record, dumps, is_batch_value
from schemas.events import (
    TENANT_PATTERN,
    USAGE_TYPE,
    SubscriptionEvent,
    UsageEvent,
)
from schemas.fast_usage import Usage, from_model, item_of_row, read_checked, read_usage
from schemas.plans import Catalog, PlanMeter
from schemas.records import DeadLetter, Notification, QuotaState, dead_letter_text
from schemas.validation import EARLIEST_TIME, time_problem
from streams import dead_letters
from streams.dead_letters import DlqReason
from streams.dedup import DedupWindow, source_tag
from streams.subscriptions import Subscription

_USAGE_ONE = TypeAdapter(UsageEvent)
_SUBSCRIPTION_ONE = TypeAdapter(SubscriptionEvent)

# Accepted events are built as dicts in AcceptedEvent's JSON form (a model per event would
# cost more than all the other per-event work together) and encoded once a tenant has this
# many: holding a whole batch of dicts until the drain cost more in memory traffic than
# building them.
ACCEPTED_ROWS_HELD = 256
# Bounds an encoded array (a huge batch record is split): what the worker writes stays far
# below the producer's request size.
MAX_ACCEPTED_PER_ARRAY = 1000


@dataclass(frozen=True)
class ProcessorConfig:
    """Rules the worker applies; every field has a safe default."""

    dedup_horizon: timedelta = timedelta(days=35)
    max_future: timedelta = timedelta(minutes=5)


@dataclass(slots=True)
class _Placement:
    """Where events of a tenant, period and meter count (see `_place`)."""

    period: Period  # the period counted in: the event's own, or the open one (adjustment)
    plan_id: str
    late: bool
    adjustment: bool
    counter: Counter
    fixed: bool  # true for every event of the period, not only the one it was made for
    unique_dimension: str | None


@dataclass
class Effects:
    """What processing produced since the last drain, ready to be written."""

    # Per tenant, accepted events as JSON arrays of AcceptedEvent objects, ready to send.
    accepted: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: list[DeadLetter] = field(default_factory=list)
    counters: list[Counter] = field(default_factory=list)
    quota_states: list[QuotaState] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    changelog: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    duplicates: int = 0
    counted: int = 0


class PartitionProcessor:
    """All decision state of the tenants one partition owns."""

    def __init__(self, partition: int, catalog: Catalog, config: ProcessorConfig) -> None:
        self.partition = partition
        self.catalog = catalog
        self.config = config
        self.counters: dict[tuple[str, str, datetime], Counter] = {}
        self.current_period: dict[tuple[str, str], datetime] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self._trialing: set[str] = set()
        self.dedup = DedupWindow(config.dedup_horizon)
        self.watermark = datetime.fromtimestamp(0, UTC)
        self._touched: set[tuple[str, str, datetime]] = set()
        self._touched_subscriptions: set[str] = set()
        self._effects = Effects()
        # Aware event time -> (UTC time, its ISO text), and record timestamp -> (ingestion
        # time, its ISO text, the latest event time allowed); emptied at every drain.
        self._utc_times: dict[datetime, tuple[datetime, str]] = {}
        self._ingestion_times: dict[int, tuple[datetime, str, datetime]] = {}
        # (tenant, period start, meter) -> fixed placement of events that are not late,
        # kept while nothing that decides it changes: emptied at every drain and on any
        # subscription or catalog change.
        self._known_places: dict[tuple[str, datetime, str], _Placement] = {}
        self._last_period: dict[str, Period] = {}  # a tenant's period of its latest event
        self._records_seen = 0  # numbers each processed record (see _start_folding)
        # Distinct values read back by `restore`, per counter and segment number, until
        # `finish_restore` gives them to the counters.
        self._distinct_read: dict[tuple[str, str, datetime], dict[int, list[str]]] = {}
        self._accepted_rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._valid_tenants: set[str] = set()  # record keys that are valid tenant ids
        self._lateness = {name: m.lateness for name, m in catalog.meters.items()}
        self._source = partition  # the source partition of the record being processed

    @property
    def counted_since_drain(self) -> int:
        """Events counted (folded into a counter) since the last drain."""
        return self._effects.counted

    # --- usage -------------------------------------------------------------------------

    def process_usage(
        self, topic: str, offset: int, key: bytes | None, value: bytes | None, timestamp_ms: int,
        checked: bool = False, source_partition: int | None = None,
    ) -> None:
        """Fold one usage record (a single event or a batch) into state and effects.

        `checked`: the value is what `check_record` made of the record in the pre-batching
        stage (schemas/fast_usage.py), not the record's own value. `source_partition`: the
        partition of `topic` it was read from (None: the processor's own number)."""
        self._source = self.partition if source_partition is None else source_partition
        tenant = key.decode("utf-8", "replace") if key else None
        ingested = self._ingestion_times.get(timestamp_ms)
        if ingested is None:  # records of a batch often share a timestamp
            ingested = self._ingestion_time(timestamp_ms)
            if ingested is None:
                self._dead(topic, offset, tenant, "invalid_timestamp",
                           f"record timestamp {timestamp_ms} ms is not between "
                           f"{EARLIEST_TIME.isoformat()} and {_LATEST_INGESTION.isoformat()}",
                           None, value or b"")
                return
            self._ingestion_times[timestamp_ms] = ingested
        if ingested[0] > self.watermark:
            self.watermark = ingested[0]
        if not tenant:
            self._dead(topic, offset, tenant, "missing_key", "record has no key (the tenant id)",
                       None, value or b"")
            return
        if checked:
            assert value is not None  # check_record writes a value for every record
            is_batch, rows, read_events = read_checked(value, tenant)
            self._fold_usage(topic, offset, tenant, ingested, is_batch, read_events,
                             lambda index: item_of_row(rows[index], tenant))
            return
        try:
            items = decode_record(value)
        except RecordDecodeError as e:
            self._dead(topic, offset, tenant, "invalid_json", str(e), None, value or b"")
            return
        assert value  # decode_record refuses an empty value
        is_batch = is_batch_value(value)
        # The key is checked once: the fast path then only has to compare subjects to it.
        valid_tenant = tenant if tenant in self._valid_tenants else None
        if valid_tenant is None and TENANT_PATTERN.fullmatch(tenant):
            if len(self._valid_tenants) >= 100_000:
                self._valid_tenants.clear()
            self._valid_tenants.add(tenant)
            valid_tenant = tenant
        meters = self.catalog.meters
        events = [read_usage(item, valid_tenant, meters) for item in items]
        self._fold_usage(topic, offset, tenant, ingested, is_batch, events, items.__getitem__)

    def _ingestion_time(self, timestamp_ms: int) -> tuple[datetime, str, datetime] | None:
        """(ingestion time, its ISO text, the latest event time allowed) of a record
        timestamp; None for a timestamp no period arithmetic can use (a producer may set
        any: it must not crash the worker, nor move its watermark to the end of time)."""
        try:
            moment = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
        except (OverflowError, ValueError, OSError):
            return None
        if not EARLIEST_TIME <= moment < _LATEST_INGESTION:
            return None
        return moment, moment.isoformat(), moment + self.config.max_future

    def _fold_usage(
        self, topic: str, offset: int, tenant: str, ingested: tuple[datetime, str, datetime],
        is_batch: bool, events: Sequence[Usage | None], item_at: Callable[[int], Any],
    ) -> None:
        """Fold the events of one record; `item_at` gives the event at an index as it was
        sent, for the model to read where the fast path gave None, and for dead letters."""
        ingested_at, ingested_text, latest_allowed = ingested
        meters = self.catalog.meters
        from_partition = self._source
        home = from_partition == self.partition
        # What the dedup window holds for this record (see dedup.source_tag).
        tag = offset if home else source_tag(offset, from_partition)
        self._records_seen += 1
        record_no = self._records_seen
        dedup = self.dedup
        watermark = self.watermark
        utc_times = self._utc_times

        ids_here: set[str] = set()
        accepted = self._accepted_rows[tenant]
        counted = 0
        period = self._last_period.get(tenant)  # the event's own period
        # Events of a record mostly share a period and a meter: where they count is worked
        # out again only when either changes, or for every event if it is not `fixed`.
        place: _Placement | None = None
        place_period: Period | None = None
        place_meter = ""
        for index, event in enumerate(events):
            if event is None:
                event = self._usage_by_model(item_at(index), topic, offset,
                                             index if is_batch else None, tenant)
                if event is None:
                    continue
            event_id, source, _, aware_time, meter, quantity, dimensions = event
            if meter not in meters:
                self._dead(topic, offset, tenant, "unknown_meter",
                           f"meter {meter!r} is not in the plan catalog",
                           index if is_batch else None, item_at(index))
                continue
            if aware_time > latest_allowed:
                self._dead(topic, offset, tenant, "time_in_future",
                           f"event time {aware_time.isoformat()} is more than "
                           f"{self.config.max_future} after ingestion {ingested_at.isoformat()}",
                           index if is_batch else None, item_at(index))
                continue
            in_utc = utc_times.get(aware_time)
            if in_utc is None:  # events of a batch often share a timestamp
                problem = time_problem(aware_time)  # the readers checked it: a safety net
                if problem is not None:
                    self._dead(topic, offset, tenant, "invalid_event", f"time: {problem}",
                               index if is_batch else None, item_at(index))
                    continue
                moment = aware_time.astimezone(UTC)
                in_utc = utc_times[aware_time] = (moment, moment.isoformat())
            event_time, event_time_text = in_utc
            # Dedup: first sight, a replay of the same record, or a real duplicate.
            bucket = dedup.bucket_for(tenant, event_time, watermark)
            if not dedup.claim(bucket, event_id, tag) or event_id in ids_here:
                self._effects.duplicates += 1
                continue
            ids_here.add(event_id)

            if period is None or not period.start <= event_time < period.end:
                period = self._last_period[tenant] = self.period_of(tenant, event_time)
            if place is None or place_period is not period or place_meter != meter \
                    or not place.fixed:
                place = self._place(tenant, period, meter, event_time, ingested_at)
                place_period, place_meter = period, meter
                # What every accepted event of this placement says alike.
                counter, unique_dimension = place.counter, place.unique_dimension
                aggregation, plan_id = counter.aggregation, place.plan_id
                start_text, end_text = place.period.start_text, place.period.end_text
                late, adjustment = place.late, place.adjustment
            # The record's first event in this counter: mark the record applied.
            if home:
                if counter.applied_offset < offset:
                    counter.applied_offset = offset
                    self._start_folding(counter, record_no)
            elif counter.applied_from.get(from_partition, -1) < offset:
                counter.applied_from[from_partition] = offset
                self._start_folding(counter, record_no)
            unique = dimensions.get(unique_dimension) if unique_dimension else None
            if counter.folding_record == record_no:  # not folded before (replay, re-send)
                counter.fold(quantity, unique, event_time)
                counted += 1
            accepted.append({
                "tenant_id": tenant, "event_id": event_id, "meter": meter,
                "aggregation": aggregation, "unique_value": unique,
                "quantity": str(quantity), "event_time": event_time_text,
                "ingested_at": ingested_text, "source": source, "dimensions": dimensions,
                "period_start": start_text, "period_end": end_text,
                "plan_id": plan_id, "late": late, "adjustment": adjustment,
            })
        self._effects.counted += counted
        if len(accepted) >= ACCEPTED_ROWS_HELD:
            self._flush_accepted(tenant, accepted)

    def _flush_accepted(self, tenant: str, rows: list[dict[str, Any]]) -> None:
        arrays = self._effects.accepted[tenant]
        for i in range(0, len(rows), MAX_ACCEPTED_PER_ARRAY):
            arrays.append(dumps(rows[i:i + MAX_ACCEPTED_PER_ARRAY]))
        rows.clear()

    def _place(self, tenant: str, period: Period, meter: str, event_time: datetime,
               ingested_at: datetime) -> _Placement:
        """Where an event of `period` for `meter`, ingested at `ingested_at`, counts."""
        if ingested_at < period.end:  # not late: perhaps worked out for an earlier record
            known = self._known_places.get((tenant, period.start, meter))
            if known is not None:
                return known
        counted_in, plan_id, late, adjustment = self._placement(
            tenant, period, event_time, ingested_at, self._lateness[meter])
        sub = self.subscriptions.get(tenant)
        # The plan is the same for every event of the period unless it is canceled inside
        # it; an adjustment's plan is that at ingestion, the same for the record.
        fixed = (adjustment or sub is None or sub.cancel_at is None
                 or not period.start < sub.cancel_at < period.end)
        place = _Placement(counted_in, plan_id, late, adjustment,
                           self._counter(tenant, meter, counted_in), fixed,
                           self.catalog.meters[meter].unique_dimension)
        if fixed and not late:
            self._known_places[(tenant, period.start, meter)] = place
        return place

    def _forget_places(self) -> None:
        """Forget where events counted: a subscription, the catalog or the batch changed."""
        self._known_places.clear()
        self._last_period.clear()

    def _start_folding(self, counter: Counter, record_no: int) -> None:
        """Mark `counter` as folding the record processed as `record_no` (the caller has
        marked its offset applied)."""
        counter.folding_record = record_no
        key = (counter.tenant_id, counter.meter, counter.period_start)
        self._touched.add(key)
        self._note_current(*key)

    def _counter(self, tenant: str, meter: str, period: Period) -> Counter:
        key = (tenant, meter, period.start)
        counter = self.counters.get(key)
        if counter is None:
            spec = self.catalog.meters[meter]
            counter = self.counters[key] = Counter(tenant, meter, period.start, period.end,
                                                   spec.aggregation)
        return counter

    def _usage_by_model(self, item: Any, topic: str, offset: int, where: int | None,
                        tenant: str) -> Usage | None:
        """The model's verdict on an item the fast path declined: the event, or None after
        a dead letter naming what is wrong with it."""
        reason: DlqReason
        if not isinstance(item, dict) or item.get("type") != USAGE_TYPE:
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            reason, detail = "unknown_type", f"not a {USAGE_TYPE} event (type {kind!r})"
        else:
            try:
                event = _USAGE_ONE.validate_python(item)
            except ValidationError as e:
                reason, detail = dead_letters.reason_of(e), dead_letters.detail_of(e)
            else:
                if event.subject != tenant:
                    reason = "subject_mismatch"
                    detail = f"subject {event.subject!r} != record key {tenant!r}"
                else:
                    return from_model(event)  # its meter is checked with the others
        self._dead(topic, offset, tenant, reason, detail, where, item)
        return None

    def _placement(
        self, tenant: str, period: Period, event_time: datetime, ingested_at: datetime,
        lateness: timedelta,
    ) -> tuple[Period, str, bool, bool]:
        """The period and plan an event in `period` counts under, and whether it is late or
        an adjustment."""
        late = ingested_at >= period.end
        adjustment = late and ingested_at >= period.end + lateness
        moment = event_time
        if adjustment:
            # Too late for its own period (which may be invoiced): count it in the open one.
            period = self.period_of(tenant, ingested_at)
            moment = ingested_at
        return period, self.plan_of(tenant, moment), late, adjustment

    def period_of(self, tenant: str, moment: datetime) -> Period:
        sub = self.subscriptions.get(tenant)
        if sub is None:
            return calendar_month(moment)
        return anniversary_period(sub.period, moment)

    def plan_of(self, tenant: str, moment: datetime) -> str:
        sub = self.subscriptions.get(tenant)
        plan_id = sub.plan_at(moment, self.catalog.default_plan) if sub else None
        return self.catalog.plan(plan_id)[0]

    def _note_current(self, tenant: str, meter: str, period_start: datetime) -> None:
        key = (tenant, meter)
        if period_start > self.current_period.get(key, _BEGINNING):
            self.current_period[key] = period_start

    # --- subscriptions -----------------------------------------------------------------

    def process_subscription(
        self, topic: str, offset: int, key: bytes | None, value: bytes | None,
        source_partition: int | None = None,
    ) -> None:
        """Apply subscription lifecycle events; a replayed record changes nothing.
        `source_partition`: as for `process_usage`."""
        self._source = self.partition if source_partition is None else source_partition
        other_source = None if self._source == self.partition else self._source
        tenant = key.decode("utf-8", "replace") if key else None
        try:
            items = decode_record(value)
        except RecordDecodeError as e:
            self._dead(topic, offset, tenant, "invalid_json", str(e), None, value)
            return
        for item in items:
            try:
                event = _SUBSCRIPTION_ONE.validate_python(item)
            except ValidationError as e:
                self._dead(topic, offset, tenant, "invalid_event", dead_letters.detail_of(e),
                           None, item)
                continue
            if event.subject != tenant:
                self._dead(topic, offset, tenant, "subject_mismatch",
                           f"subject {event.subject!r} != key {tenant!r}", None, item)
                continue
            current = self.subscriptions.get(event.subject)
            if current is not None and current.applied(other_source) >= offset:
                continue
            new = Subscription.after(event, offset)
            new.carry_over(current, other_source, offset)
            self._set_subscription(event.subject, new)
            self._touched_subscriptions.add(event.subject)

    def _set_subscription(self, tenant: str, subscription: Subscription) -> None:
        self.subscriptions[tenant] = subscription
        self._forget_places()
        # Only trialing tenants are scanned for trial notices, at every drain.
        if subscription.status == "trialing":
            self._trialing.add(tenant)
        else:
            self._trialing.discard(tenant)

    def _dead(
        self, topic: str, offset: int, tenant: str | None, reason: DlqReason, detail: str,
        index: int | None, raw: Any,
    ) -> None:
        self._effects.dead_letters.append(DeadLetter(
            reason=reason, detail=detail, source_topic=topic, source_partition=self._source,
            source_offset=offset, index=index, key=tenant, value=dead_letter_text(raw),
        ))

    # --- catalog -----------------------------------------------------------------------

    def use_catalog(self, catalog: Catalog) -> None:
        """Switch to a new plan catalog; current quota states are re-evaluated."""
        self.catalog = catalog
        self._lateness = {name: m.lateness for name, m in catalog.meters.items()}
        self._forget_places()
        self._touched.update(
            (t, m, start) for (t, m), start in self.current_period.items()
        )

    # --- effects -----------------------------------------------------------------------

    def drain(self) -> Effects:
        """Everything to write for the records processed since the last drain."""
        for tenant, rows in self._accepted_rows.items():
            if rows:
                self._flush_accepted(tenant, rows)
        self._accepted_rows.clear()
        effects, self._effects = self._effects, Effects()
        self._utc_times.clear()
        self._ingestion_times.clear()
        self._forget_places()
        self.dedup.evict_before(self.watermark)
        self._notice_trials(effects)
        for tenant in self._touched_subscriptions:
            self._touched.update(
                (t, m, start) for (t, m), start in self.current_period.items() if t == tenant
            )
            effects.changelog.append((f"s/{tenant}", self.subscriptions[tenant].to_state()))
        self._touched_subscriptions.clear()
        for key in sorted(self._touched):
            counter = self.counters[key]
            effects.counters.append(counter)
            if self.current_period.get((key[0], key[1])) == key[2]:
                self._evaluate(counter, effects)
            segment = counter.take_distinct_segment()
            if segment is not None:  # before the state that counts it (see finish_restore)
                index, values = segment
                effects.changelog.append((f"u/{counter_key(*key)}/{index}", {"values": values}))
            effects.changelog.append(("c/" + counter_key(*key), counter.to_state()))
        self._touched.clear()
        effects.changelog.extend(self.dedup.drain_changes())
        effects.changelog.append(("w/", {"watermark": self.watermark.isoformat()}))
        return effects

    def _notice_trials(self, effects: Effects) -> None:
        """Emit each trial's `trial_ending` notice once, `trials.DEFAULT_NOTICE` before it
        ends (by the watermark); the flag reaches the changelog in the same batch."""
        for tenant in self._trialing:
            sub = self.subscriptions[tenant]
            if trials.trial_ending_due(sub.status, sub.trial_end, sub.trial_notified,
                                       self.watermark):
                sub.trial_notified = sub.trial_end
                self._touched_subscriptions.add(tenant)
                effects.notifications.append(trials.trial_ending_notification(
                    tenant, self.catalog.plan(sub.plan_id)[0], sub.period.start))

    def _evaluate(self, counter: Counter, effects: Effects) -> None:
        # The plan in force now (the watermark), seen from inside the counter's period.
        moment = min(max(self.watermark, counter.period_start),
                     counter.period_end - timedelta(microseconds=1))
        plan_id, plan = self.catalog.plan(self.plan_of(counter.tenant_id, moment))
        terms: PlanMeter | None = plan.meters.get(counter.meter)
        used = counter.value
        effects.quota_states.append(QuotaState(
            tenant_id=counter.tenant_id, meter=counter.meter, plan_id=plan_id,
            period_start=counter.period_start, period_end=counter.period_end, used=used,
            included=terms.included if terms else None,
            limit=terms.hard_limit if terms else None,
            remaining=quota.remaining(used, terms),
            state=quota.status(used, terms),
        ))
        for kind, percent in quota.crossed_thresholds(used, terms):
            tag = f"{plan_id}:{kind}:{percent}"
            if tag in counter.notified:
                continue
            counter.notified.add(tag)
            effects.notifications.append(Notification(
                tenant_id=counter.tenant_id, meter=counter.meter, plan_id=plan_id,
                period_start=counter.period_start, kind=kind,
                threshold_percent=percent, used=used,
                limit=terms.hard_limit if terms else None,
            ))

    # --- recovery ----------------------------------------------------------------------

    def restore(self, key: str, value: dict[str, Any] | None) -> None:
        """Apply one changelog entry read back from the worker-state topic; call
        `finish_restore` after the last one.

        Keys: `c/<counter key>` a counter's state, `u/<counter key>/<n>` segment n of a
        unique_count counter's distinct values, `s/<tenant>` a subscription,
        `d/<day>/<n>` a dedup segment (`d/<tenant>/<day>/<n>` in older state), `w/` the
        watermark.
        """
        kind = key[:2]
        if kind == "c/":
            if value is None:
                return
            counter = Counter.from_state(value)
            k = (counter.tenant_id, counter.meter, counter.period_start)
            self.counters[k] = counter
            self._note_current(counter.tenant_id, counter.meter, counter.period_start)
        elif kind == "u/" and value is not None:
            tenant, meter, start, index = key[2:].split("/")  # none of them holds a "/"
            counter_id = (tenant, meter, datetime.fromisoformat(start))
            self._distinct_read.setdefault(counter_id, {})[int(index)] = value["values"]
        elif kind == "s/" and value is not None:
            self._set_subscription(key[2:], Subscription.from_state(value))
        elif kind == "d/":
            self.dedup.restore_segment(key, value)
        elif kind == "w/" and value is not None:
            self.watermark = datetime.fromisoformat(value["watermark"])

    def finish_restore(self) -> None:
        """Give restored counters the distinct values read back from their segments.

        A crash may have stored a batch's segment without the counter state that counts
        it, or the state (which carries the newest segment's values) without the segment.
        Either way the values count, and are written again with the counter's next
        segment: the replayed records would not add them anew, since they are known.
        """
        self.dedup.finish_restore()
        for counter_id, counter in self.counters.items():
            segments = self._distinct_read.get(counter_id, {})
            for index, values in sorted(segments.items()):
                counter.restore_distinct(values)
                if index >= counter.distinct_segments:  # its state was lost
                    counter.distinct_unwritten.extend(values)
            if counter.distinct_latest and counter.distinct_segments - 1 not in segments:
                counter.distinct_unwritten.extend(counter.distinct_latest)  # segment lost
        self._distinct_read.clear()


_BEGINNING = datetime.min.replace(tzinfo=UTC)
# Record timestamps from here on are refused: periods, lateness windows and the dedup
# horizon are worked out from ingestion time, and must stay far from datetime's end.
_LATEST_INGESTION = datetime(9000, 1, 1, tzinfo=UTC)


def counter_key(tenant: str, meter: str, period_start: datetime) -> str:
    """The compacted key of a counter: `tenant/meter/period_start` (DESIGN.md)."""
    return f"{tenant}/{meter}/{period_start.isoformat()}"
