"""Baseline: a quixstreams app doing the same stateful per-tenant sum.

    python -m bench.baselines.quix_sum BOOTSTRAP TOPIC EXPECTED_EVENTS STATE_DIR

Prints `DONE <events> <seconds>` (first to last event processed) and exits.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import orjson
from quixstreams import Application, State

bootstrap, topic_name, expected, state_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    sys.argv[4]
seen = {"events": 0, "first": 0.0}


def add(value: bytes, state: State) -> None:
    if not seen["first"]:
        seen["first"] = time.perf_counter()
    parsed = orjson.loads(value)
    for event in parsed if isinstance(parsed, list) else [parsed]:
        key = event["subject"]
        state.set(key, state.get(key, 0) + int(event["data"]["quantity"]))
        seen["events"] += 1
    if seen["events"] >= expected:
        print(f"DONE {seen['events']} {time.perf_counter() - seen['first']:.4f}", flush=True)
        os._exit(0)


def main() -> None:
    app = Application(
        broker_address=bootstrap, consumer_group=f"bench-quix-{topic_name}",
        auto_offset_reset="earliest", state_dir=state_dir, use_changelog_topics=True,
    )
    topic: Any = app.topic(topic_name, value_deserializer="bytes")
    app.dataframe(topic).update(add, stateful=True)
    app.run()


if __name__ == "__main__":
    main()
