"""JSON Schema files generated from the models, for services written in other languages.

`make schemas` (python -m schemas.export) rewrites `schemas/json/`; a test fails when the
committed files differ from what the models generate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.events import SubscriptionEvent, UsageEvent
from schemas.plans import Catalog
from schemas.records import AcceptedEvent, CounterValue, DeadLetter, Notification, QuotaState

JSON_DIR = Path(__file__).resolve().parent / "json"

MODELS: dict[str, type[BaseModel]] = {
    "usage-event.v1": UsageEvent,
    "subscription-event.v1": SubscriptionEvent,
    "plan-catalog": Catalog,
    "accepted-event": AcceptedEvent,
    "counter": CounterValue,
    "quota-state": QuotaState,
    "dead-letter": DeadLetter,
    "notification": Notification,
}


def render() -> dict[str, str]:
    """File name -> JSON Schema text of every exported model."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True)
        + "\n"
        for name, model in MODELS.items()
    }


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (JSON_DIR / name).write_text(text)
    print(f"wrote {len(MODELS)} schemas to {JSON_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
