"""Baseline: the textbook Faust agent — one event per iteration, a Faust table per tenant.

    python -m bench.baselines.faust_textbook BOOTSTRAP TOPIC EXPECTED_EVENTS WEB_PORT PARTITIONS

Prints `DONE <events> <seconds>` (first to last event processed) and exits.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import faust
import orjson

from streams.faust_transport import Worker

bootstrap, topic_name = sys.argv[1], sys.argv[2]
expected, web_port, partitions = (int(a) for a in sys.argv[3:6])
app = faust.App(
    f"bench-textbook-{topic_name}", broker=f"kafka://{bootstrap}", value_serializer="raw",
    broker_session_timeout=4, broker_heartbeat_interval=0.5, web_port=web_port,
    store="memory://", consumer_auto_offset_reset="earliest",
    topic_partitions=partitions,  # the table's changelog must match the source topic
    datadir=tempfile.mkdtemp(prefix="bench-textbook-"),  # not the current directory
)
topic = app.topic(topic_name)
totals = app.Table("totals", default=int)
seen = {"events": 0, "first": 0.0}


@app.agent(topic)
async def count(stream: faust.StreamT[bytes]) -> None:
    try:
        await _count(stream)
    except Exception as e:  # a crashed agent leaves Faust idling: fail the run instead
        print(f"FAILED {e!r}", flush=True)
        os._exit(1)


async def _count(stream: faust.StreamT[bytes]) -> None:
    async for value in stream:
        if not seen["first"]:
            seen["first"] = time.perf_counter()
        parsed = orjson.loads(value)
        for event in parsed if isinstance(parsed, list) else [parsed]:
            totals[event["subject"]] += int(event["data"]["quantity"])
            seen["events"] += 1
        if seen["events"] >= expected:
            print(f"DONE {seen['events']} {time.perf_counter() - seen['first']:.4f}", flush=True)
            os._exit(0)


if __name__ == "__main__":
    # redirect_stdouts=False: the DONE line must reach stdout, not Faust's logger.
    # Without the terminal spinner (as with `faust worker -l info`): at higher levels it
    # turns every library debug call into a log record, which would slow this baseline.
    worker = Worker(app, loglevel="error", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
