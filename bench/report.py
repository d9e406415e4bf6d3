"""The results of one `make bench`: `latest.json`, `latest.md` and `latest.png`.

    python -m bench.report RAW_DIR OUT_DIR [--seconds TOTAL]

Reads what each benchmark appended to its file in RAW_DIR (JSON lines, or a JSON array
for the producer's), and writes, in OUT_DIR:
- `latest.json`: every figure with its baseline and their ratio, and the target where
  the issue sets one; the machine, the git commit, the date, how long each benchmark
  took; and every raw row;
- `latest.md`: the figures as a markdown table led by the ratios, the freshness table,
  the scaling table, and the profile summaries;
- `latest.png`: the scaling curves (worker throughput and memory as tenants grow and as
  events per record grow) and freshness against the event rate (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

FRESHNESS_TARGET_MS = 1000.0
FRESHNESS_TARGET_RATE = 20_000


@dataclass
class Figure:
    """One measured figure against its baseline from the same run."""

    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float
    target: str = ""
    met: bool | None = None
    note: str = ""


def append_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    """Append a bench's rows to its results file, one JSON line each, stamped now (what
    `read_rows` reads)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("ab") as f:
        for row in rows:
            row["at"] = datetime.now(UTC).isoformat()
            f.write(orjson.dumps(row) + b"\n")


def read_rows(raw: Path) -> dict[str, list[dict[str, Any]]]:
    """Every row of every results file, by file stem."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(raw.glob("*.json*")):
        text = path.read_bytes().strip()
        if not text:
            continue
        if text.startswith(b"["):
            loaded = orjson.loads(text)
        else:
            loaded = [orjson.loads(line) for line in text.splitlines() if line.strip()]
        rows[path.name.split(".")[0]] = loaded
    return rows


def _rounds(row: dict[str, Any]) -> str:
    return f"median of {row['rounds']} rounds" if row.get("rounds", 1) > 1 else ""


def _round_p99s(row: dict[str, Any]) -> str:
    rounds = row.get("round_figures", [])
    return (f"rounds' p99 {', '.join(str(r['p99_ms']) for r in rounds)} ms"
            if len(rounds) > 1 else "")


def _share(value: float, target: float) -> str:
    return "" if value >= target else f"{value / target:.0%} of the target"


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def figures(rows: dict[str, list[dict[str, Any]]]) -> list[Figure]:
    """The headline figures, each with its baseline, ratio and target."""
    out: list[Figure] = []
    for producer in rows.get("producer", [])[-1:]:
        sdk, base = producer["sdk_events_per_s"], producer["baseline_events_per_s"]
        out.append(Figure(
            "producer SDK (batched, acks=all)", sdk, "events/s",
            "aiokafka, one record per event", base, _ratio(sdk, base),
            ">= 300,000 events/s", sdk >= 300_000,
            "; ".join(n for n in (_rounds(producer), _share(sdk, 300_000)) if n)))
    worker = rows.get("worker", [])
    for dataset, label in (("batch", "batch records (500 events)"),
                           ("single", "one-event records")):
        tally = _find(worker, dataset=dataset, contender="tally")
        if tally is None:
            continue
        for contender, target, bound in (("quixstreams", ">= 2x", 2.0),
                                         ("ceiling", ">= 0.75x", 0.75),
                                         ("faust-textbook", "", 0.0)):
            base = _find(worker, dataset=dataset, contender=contender)
            if base is None:
                continue
            ratio = _ratio(tally["events_per_s"], base["events_per_s"])
            out.append(Figure(
                f"worker, {label}", tally["events_per_s"], "events/s",
                _BASELINE_NAMES[contender], base["events_per_s"], ratio, target,
                ratio >= bound if target else None,
                f"medians of {tally['rounds']} rounds"
                + (f"; {ratio / bound:.0%} of the target ratio" if target and ratio < bound
                   else "")))
    projection = rows.get("projection", [])
    batched = _find(projection, bench="projection_batched_copy")
    per_event = _find(projection, bench="projection_per_event_upsert")
    if batched and per_event:
        out.append(Figure(
            "projector (accepted events -> ledger + rollups)", batched["events_per_s"],
            "events/s", "one upsert per event", per_event["events_per_s"],
            _ratio(batched["events_per_s"], per_event["events_per_s"]),
            ">= 120,000 events/s", batched["events_per_s"] >= 120_000,
            "; ".join(n for n in (_rounds(batched), _share(batched["events_per_s"], 120_000))
                      if n)))
    for rebuilt in rows.get("rebuild", [])[-1:]:
        out.append(Figure(
            f"projections rebuild of {rebuilt['events']:,} events (build, swap, vacuum)",
            rebuilt["rebuild_seconds"], "s", "the projector over the same log",
            rebuilt["projector_seconds"],
            _ratio(rebuilt["rebuild_seconds"], rebuilt["projector_seconds"]),
            "< 120 s for 1M events",
            rebuilt["rebuild_seconds"] < 120 if rebuilt["events"] >= 1_000_000 else None,
            f"{rebuilt['rebuild_events_per_s']:,} events/s; phases "
            + ", ".join(f"{k} {v} s" for k, v in rebuilt["rebuild_phases"].items())))
    for quota in rows.get("quota_view", [])[-1:]:
        out.append(Figure(
            "QuotaView.check p99", quota["p99_us"], "µs", "target", quota["target_p99_us"],
            _ratio(quota["p99_us"], quota["target_p99_us"]), "< 20 µs",
            quota["p99_us"] < quota["target_p99_us"]))
    for row in rows.get("latency", []):
        if row.get("bench") != "freshness" or row.get("phase") != "rate":
            continue
        rate = row["rate_events_per_s"]
        for end, label in (("quota_state", "quota state"), ("ledger", "ledger")):
            p99 = row[end].get("p99_ms")
            if p99 is None:
                continue
            targeted = rate == FRESHNESS_TARGET_RATE
            out.append(Figure(
                f"event -> {label} p99 at {rate:,} events/s, all stages on 2 cores", p99, "ms",
                "1 s budget", FRESHNESS_TARGET_MS, _ratio(p99, FRESHNESS_TARGET_MS),
                "< 1,000 ms" if targeted else "", p99 < FRESHNESS_TARGET_MS if targeted else None,
                "; ".join(n for n in (
                    "" if row["held"] else "lag grew: not held",
                    f"other processes used {row['cpu_cores'].get('other processes', '?')} "
                    f"of the {os.cpu_count()} cores") if n)))
    held = _find(rows.get("latency", []), bench="freshness_highest_held")
    if held and not held["rate_events_per_s"]:
        out.append(Figure(
            f"highest rate held {held['seconds']:.0f} s without growing lag", 0, "events/s",
            "rates tried", max(held.get("probed", []), default=0), 0.0,
            note="no rate held for the long window"))
    elif held:
        hold = held.get("hold") or {}
        out.append(Figure(
            f"highest rate held {held['seconds']:.0f} s without growing lag",
            held["rate_events_per_s"], "events/s", "rates tried",
            max([*held.get("probed", []), held["rate_events_per_s"]], default=0),
            _ratio(held["rate_events_per_s"],
                   max([*held.get("probed", []), held["rate_events_per_s"]], default=0)),
            note=f"quota p99 {hold.get('quota_state', {}).get('p99_ms')} ms, ledger p99 "
                 f"{hold.get('ledger', {}).get('p99_ms')} ms"))
    return out + read_figures(rows.get("read", []))


_READ = {"read_meter_query": "meter query (one tenant, one month, by day, by one dimension)",
         "read_current_usage": "current usage with charges",
         "read_consume_sequential": "entitlement consume end to end, one at a time",
         "read_consume": "entitlement consume end to end",
         "read_consume_overload": "entitlement consume end to end, beyond the target rate"}


def read_figures(rows: list[dict[str, Any]]) -> list[Figure]:
    """The read side (bench/bench_read.py): each p99 against the bare HTTP endpoint's,
    measured the same way in the same run."""
    out: list[Figure] = []
    loaded = _find(rows, bench="read_load")
    size = (f"{loaded['events']:,} events, {loaded['tenants']:,} tenants" if loaded else "")
    for bench, label in _READ.items():
        row = _find(rows, bench=bench)
        if row is None:
            continue
        # A consume at a rate is set against its own I/O alone at that rate (two Postgres
        # round trips, one acknowledged publish), what the machine's Postgres and broker
        # allow; the other figures against the bare HTTP endpoint.
        io = row.get("baseline_consume_io")
        base_name, base = (("the consume's I/O alone, p99", io["p99_ms"]) if io else
                           ("bare HTTP endpoint p99", row["baseline_http"]["p99_ms"]))
        rate = f" at {row['rate']} requests/s, open loop" if "rate" in row else ", sequential"
        target = row.get("target_p99_ms")
        out.append(Figure(
            f"{label} p99{rate}", row["p99_ms"], "ms", base_name, base,
            _ratio(row["p99_ms"], base), f"< {target:g} ms" if target else "",
            row["p99_ms"] < target if target else None,
            "; ".join(n for n in (size, f"p50 {row['p50_ms']} ms", _rounds(row),
                                  _round_p99s(row)) if n)))
    return out


def read_section(raw: dict[str, list[dict[str, Any]]]) -> list[str]:
    """How the read side's ledger was loaded, and its figures with their baselines."""
    rows = raw.get("read", [])
    loaded = _find(rows, bench="read_load")
    if loaded is None:
        return []
    steps = ", ".join(f"{k} {v} s" for k, v in loaded["steps"].items())
    lines = ["", "## Read side", "",
             f"`tally api serve` over {loaded['events']:,} ledger events of "
             f"{loaded['tenants']:,} tenants (`bench/bench_read.py`), loaded in "
             f"{loaded['seconds']} s ({steps}): {loaded['how']}.", "",
             "| figure | p50 / p95 / p99 | bare HTTP p50 / p95 / p99 | SELECT 1 p99 | answers |",
             "| --- | ---: | ---: | ---: | --- |"]
    for bench, label in _READ.items():
        row = _find(rows, bench=bench)
        if row is None:
            continue
        base, sql = row["baseline_http"], row.get("baseline_select_1", {})
        lines.append(
            f"| {label} | {row['p50_ms']} / {row['p95_ms']} / **{row['p99_ms']}** ms | "
            f"{base['p50_ms']} / {base['p95_ms']} / {base['p99_ms']} ms | "
            f"{sql.get('p99_ms', '')} | {row['statuses']} |")
    consume = _find(rows, bench="read_consume")
    if consume and consume.get("phase_mean_ms"):
        phases = ", ".join(f"{k} {v} ms" for k, v in consume["phase_mean_ms"].items())
        lines += ["", f"Consume, mean time per phase in the API (`tally_api_consume_phase_"
                  f"seconds`): {phases}."]
    if consume and "api_cpu_ms_per_consume" in consume:
        bare = consume["baseline_http"].get("api_cpu_ms_per_request", "?")
        cores = ", ".join(f"{k} {v}" for k, v in consume.get("cores", {}).items())
        lines += ["", f"The API's CPU per consume: {consume['api_cpu_ms_per_consume']} ms "
                  f"(per bare request: {bare} ms); cores used during the consumes: {cores}."]
    if consume and "baseline_consume_io" in consume:
        io = consume["baseline_consume_io"]
        lines += ["", "The consume's I/O alone at the same rate, from the load generator (two "
                  "Postgres round trips under an advisory lock, one event published and "
                  f"acknowledged): p50 / p95 / p99 {io['p50_ms']} / {io['p95_ms']} / "
                  f"**{io['p99_ms']}** ms."]
    overload = _find(rows, bench="read_consume_overload")
    if overload:
        io = overload["baseline_consume_io"]
        lines += ["", f"Consume at {overload['rate']} requests/s (no target: "
                  "beyond what one-at-a-time decisions would hold): p50 / p95 / p99 "
                  f"{overload['p50_ms']} / {overload['p95_ms']} / **{overload['p99_ms']}** ms, "
                  f"{overload['uses_per_batch']} uses decided per batch, "
                  f"{overload['api_cpu_ms_per_consume']} ms of the API's CPU per consume; "
                  f"its I/O alone p99 {io['p99_ms']} ms."]
    if consume and len(consume.get("round_figures", [])) > 1:
        lines += ["", "Consume rounds at the same rate (each followed by its I/O alone), "
                  "the median kept above: " + "; ".join(
                      f"p50 / p95 / p99 / max {r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']} / "
                      f"{r['max_ms']} ms (I/O alone p99 {r['io_p99_ms']} ms)"
                      for r in consume["round_figures"]) + "."]
    return lines


_BASELINE_NAMES = {"quixstreams": "quixstreams, stateful per-tenant sum",
                   "ceiling": "ceiling: bare aiokafka consumer, parse only",
                   "faust-textbook": "textbook Faust agent + table"}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(memory / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "broker": os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "embedded Tansu",
            "postgres": "DATABASE_URL" if os.environ.get("DATABASE_URL")
            else "embedded PostgreSQL 18"}


def git() -> dict[str, Any]:
    def run(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    dirty = run("status", "--porcelain", "--untracked-files=no", "--", ".",
                ":(exclude)bench/results")
    return {"commit": run("rev-parse", "HEAD"), "branch": run("rev-parse", "--abbrev-ref",
                                                                "HEAD"),
            "dirty": bool(dirty)}


def _fmt(value: float, unit: str) -> str:
    if unit == "events/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:,.0f} ms"
    return f"{value:g} {unit}"


README_START = "<!-- make bench: start -->"
README_END = "<!-- make bench: end -->"


def headline(doc: dict[str, Any], image: str) -> str:
    """The ratios table and the chart, for the README."""
    lines = [f"Last run: {doc['date'][:10]}, commit `{doc['git']['commit'][:10]}`, "
             f"{doc['machine']['cpus']} shared cores, {doc['total_seconds'] / 60:.1f} min "
             "(full results, the freshness table and profiles: "
             "[bench/results/latest.md](bench/results/latest.md)).", ""]
    lines += _figures_table(doc)
    lines += ["", f"![scaling curves and freshness]({image})"]
    return "\n".join(lines)


def update_readme(readme: Path, doc: dict[str, Any]) -> bool:
    """Replace the text between the README's markers with `headline`; False if it has
    none."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[:start + len(README_START)] + "\n"
                      + headline(doc, "bench/results/latest.png") + "\n" + text[end:])
    return True


def _figures_table(doc: dict[str, Any]) -> list[str]:
    lines = ["| ratio | figure | Tally | baseline | target |",
             "| ---: | --- | ---: | --- | --- |"]
    for f in doc["figures"]:
        mark = "" if f["met"] is None else (" ✅" if f["met"] else " ❌")
        note = f" ({f['note']})" if f["note"] else ""
        lines.append(
            f"| **{f['ratio']:.2f}x** | {f['name']}{note} | {_fmt(f['value'], f['unit'])} | "
            f"{f['baseline']}: {_fmt(f['baseline_value'], f['unit'])} | "
            f"{f['target']}{mark} |")
    return lines


def markdown(doc: dict[str, Any], profiles: str) -> str:
    lines = [
        "# Benchmark results (`make bench`)",
        "",
        f"{doc['date']}, commit `{doc['git']['commit'][:10]}`"
        f"{' (uncommitted changes)' if doc['git']['dirty'] else ''}, "
        f"{doc['machine']['cpus']} cores ({doc['machine']['cpu_model'] or 'unknown CPU'}), "
        f"{doc['machine']['broker']}, {doc['machine']['postgres']}, Python "
        f"{doc['machine']['python']}; the whole run took {doc['total_seconds'] / 60:.1f} min. "
        "The machine is shared and its speed drifts: every figure is a ratio against a "
        "baseline measured in the same run.",
        "",
        *_figures_table(doc),
        *read_section(doc["raw"]),
    ]
    fresh = [r for r in doc["raw"].get("latency", []) if r.get("bench") == "freshness"]
    if fresh:
        lines += [
            "",
            "## Freshness under load",
            "",
            "From `record()` in the producer SDK to the state a `QuotaView` holds and to the "
            "ledger row in Postgres, while the SDK, the worker (and its pre-batching child), "
            "the projector, the broker and Postgres share the machine "
            "(`bench/bench_latency.py`).",
            "",
            "| phase | rate (sent) | quota state p50 / p95 / p99 | ledger p50 / p95 / p99 |"
            " lag start → end (quota, ledger) | held | cores used |",
            "| --- | ---: | ---: | ---: | --- | --- | ---: |",
        ]
        for r in fresh:
            q, led = r["quota_state"], r["ledger"]
            lines.append(
                f"| {r.get('phase', '')} {r['seconds']:.0f} s | {r['rate_events_per_s']:,} "
                f"({r['sent_events_per_s']:,}) | {q.get('p50_ms')} / {q.get('p95_ms')} / "
                f"**{q.get('p99_ms')}** ms | {led.get('p50_ms')} / {led.get('p95_ms')} / "
                f"**{led.get('p99_ms')}** ms | {r['quota_state_lag_s'][0]}→"
                f"{r['quota_state_lag_s'][1]} s, {r['ledger_lag_s'][0]}→{r['ledger_lag_s'][1]}"
                f" s | {'yes' if r['held'] else 'no'} | {r['cpu_cores'].get('total')} |")
        cores = fresh[0]["cpu_cores"]
        lines += ["", "Cores used per stage in each phase (CPU seconds / wall seconds; "
                  "\"other processes\": the rest of the machine's busy time, other work on "
                  "the shared machine), and the stages' own counters:", "",
                  "| phase | rate | " + " | ".join(k for k in cores)
                  + " | worker batches/s, ms each | projector transactions/s, ms each |",
                  "| --- | ---: |" + " ---: |" * len(cores) + " ---: | ---: |"]
        for r in fresh:
            st = r.get("stages", {})
            lines.append(
                f"| {r.get('phase', '')} | {r['rate_events_per_s']:,} | "
                + " | ".join(str(r["cpu_cores"].get(k, "")) for k in cores)
                + f" | {st.get('worker_batches_per_s', '')}, {st.get('worker_ms_per_batch', '')}"
                f" | {st.get('projector_transactions_per_s', '')}, "
                f"{st.get('projector_ms_per_transaction', '')} |")
    scaling = [r for r in doc["raw"].get("worker", []) if r.get("bench") == "worker_scaling"]
    if scaling:
        lines += ["", "## Scaling (one run per point)", "",
                  "| axis | value | Tally events/s | ceiling events/s | of ceiling |"
                  " peak memory (worker + pre-batching) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in scaling:
            lines.append(f"| {r['axis'].replace('_', ' ')} | {r['value']:,} | "
                         f"{r['events_per_s']:,} | {r['ceiling_events_per_s']:,} | "
                         f"{r['of_ceiling']} | {r['peak_rss_mib']} MiB |")
    lines += ["", "![scaling and freshness](latest.png)", ""]
    if doc.get("notes"):
        lines += ["## Targets missed, and why", "",
                  "From [notes.md](notes.md), the analysis behind these tables:", ""]
        lines += [f"- {n}" for n in doc["notes"]] + [""]
    lines += ["## Time per benchmark", "", "| benchmark | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in doc["bench_seconds"].items()]
    if profiles:
        lines += ["", "## Profiles", "", "Where the CPU goes in each stage (py-spy, "
                  "`bench/profiling.py`): the functions most often on top of the stack.", "",
                  profiles]
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = [r for r in doc["raw"].get("worker", []) if r.get("bench") == "worker_scaling"]
    fresh = [r for r in doc["raw"].get("latency", [])
             if r.get("bench") == "freshness" and r.get("phase") == "rate"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for row_no, (axis, label) in enumerate((("tenants", "tenants"),
                                            ("events_per_record", "events per record"))):
        points = sorted((r for r in scaling if r["axis"] == axis), key=lambda r: r["value"])
        xs = [r["value"] for r in points]
        ax = axes[row_no][0]
        ax.plot(xs, [r["events_per_s"] / 1000 for r in points], "o-", label="tally worker")
        ax.plot(xs, [r["ceiling_events_per_s"] / 1000 for r in points], "s--",
                label="ceiling (parse only)")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("thousand events/s")
        ax.set_title(f"worker throughput as {label} grow")
        ax.legend()
        ax.grid(alpha=0.3)
        ax = axes[row_no][1]
        ax.plot(xs, [r["peak_rss_mib"] for r in points], "o-", color="tab:red")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(f"worker peak memory as {label} grow")
        ax.grid(alpha=0.3)
    for row_no, (end, label) in enumerate((("quota_state", "quota state"),
                                           ("ledger", "ledger"))):
        ax = axes[row_no][2]
        rates = [r["rate_events_per_s"] / 1000 for r in fresh]
        for q, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
            ax.plot(rates, [r[end].get(q, float("nan")) for r in fresh], style,
                    label=q.removesuffix("_ms"))
        ax.axhline(FRESHNESS_TARGET_MS, color="grey", linestyle=":", label="1 s target")
        ax.set_xlabel("thousand events/s")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(f"event -> {label}, all stages on {doc['machine']['cpus']} cores")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"make bench, {doc['date'][:10]}, commit {doc['git']['commit'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def notes(path: Path) -> list[str]:
    """The bullets of `notes.md` beside the results: why each missed target is missed,
    written by whoever read the profiles (a bullet's continuation lines are indented)."""
    if not path.exists():
        return []
    bullets: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("- "):
            bullets.append(line[2:].strip())
        elif line.startswith("  ") and bullets:
            bullets[-1] += " " + line.strip()
    return bullets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=0.0, help="total run time")
    parser.add_argument("--bench-seconds", type=str, default="{}",
                        help="JSON object: seconds per benchmark")
    parser.add_argument("--readme", type=Path, default=None,
                        help="a README whose marked section gets the table and chart")
    args = parser.parse_args(argv)
    rows = read_rows(args.raw)
    profiles = "\n\n".join(p.read_text().strip() for p in sorted(args.raw.glob("profile-*.txt")))
    doc: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git(), "machine": machine(), "total_seconds": round(args.seconds),
        "bench_seconds": orjson.loads(args.bench_seconds),
    }
    doc["figures"] = [asdict(f) for f in figures(rows)]
    doc["notes"] = notes(args.out / "notes.md")
    doc["raw"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2)
                                          + b"\n")
    (args.out / "latest.md").write_text(markdown(doc, profiles))
    if profiles:
        (args.out / "profiles.txt").write_text(profiles + "\n")
    chart(doc, args.out / "latest.png")
    if args.readme is not None and update_readme(args.readme, doc):
        print(f"updated the results in {args.readme}")
    print(f"wrote {args.out / 'latest.json'}, latest.md, latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
