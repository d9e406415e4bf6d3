"""Extract the operations the Stripe double serves from Stripe's OpenAPI documents.

    python testkit/scripts/extract_stripe_openapi.py /path/to/stripe-openapi

reads Stripe's published documents (``spec3.2024-04-10.json.xz``, the v2 document
``spec3.v2.2025-12-15.clover.json.xz``) and ``overlay.json`` (what changed since, for the
calls Tally makes) from that folder, applies the overlay, and writes
``testkit/src/stripe_testkit/stripe_openapi.json``: for each operation, one object schema
of its parameters (query parameters for GET, the request body for POST), ``$ref``s
resolved, descriptions and responses dropped. ``stripe_testkit.openapi`` loads it at run
time. Re-run it when the double serves a new operation (add it to OPERATIONS) or Stripe's
document changes; ``STRIPE_OPENAPI.md`` beside the JSON says where the documents came from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import lzma
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "src" / "stripe_testkit" / "stripe_openapi.json"
V1 = "spec3.2024-04-10.json.xz"
V2 = "spec3.v2.2025-12-15.clover.json.xz"

# (method, path as in Stripe's document, document): every operation the double serves.
OPERATIONS: list[tuple[str, str, str]] = [
    ("post", "/v1/customers", V1),
    ("get", "/v1/customers", V1),
    ("get", "/v1/customers/search", V1),
    ("get", "/v1/customers/{customer}", V1),
    ("post", "/v1/billing/meters", V1),
    ("get", "/v1/billing/meters", V1),
    ("get", "/v1/billing/meters/{id}", V1),
    ("get", "/v1/billing/meters/{id}/event_summaries", V1),
    ("post", "/v1/billing/meter_events", V1),
    ("post", "/v1/prices", V1),
    ("get", "/v1/prices", V1),
    ("get", "/v1/prices/{price}", V1),
    ("post", "/v1/invoiceitems", V1),
    ("get", "/v1/invoiceitems", V1),
    ("get", "/v1/invoiceitems/{invoiceitem}", V1),
    ("post", "/v1/invoices", V1),
    ("get", "/v1/invoices", V1),
    ("get", "/v1/invoices/{invoice}", V1),
    ("get", "/v1/invoices/{invoice}/lines", V1),
    ("post", "/v1/invoices/{invoice}/finalize", V1),
    ("post", "/v1/invoices/{invoice}/pay", V1),
    ("post", "/v1/invoices/{invoice}/void", V1),
    ("post", "/v1/checkout/sessions", V1),
    ("post", "/v1/billing_portal/sessions", V1),
    ("post", "/v2/billing/meter_event_session", V2),
    ("get", "/v2/core/events/{id}", V2),
]

# Schema keywords the validator reads; everything else (descriptions, titles, x-stripe
# annotations) is dropped to keep the file small.
KEEP = {"type", "properties", "required", "additionalProperties", "items", "enum",
        "maxLength", "maxItems", "format", "anyOf", "oneOf", "nullable"}


def unpointer(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_overlay(doc: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove, as overlay.json asks ('-' appends once)."""
    for op in operations:
        *parents, last = [unpointer(t) for t in op["path"].split("/")[1:]]
        node: Any = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if op["op"] == "remove":
            del node[last]
        elif isinstance(node, list):
            if last == "-":
                if op["value"] not in node:
                    node.append(op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            node[last] = op["value"]


def resolve(schema: Any, doc: dict[str, Any]) -> Any:
    if isinstance(schema, list):
        return [resolve(s, doc) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target: Any = doc
        for token in schema["$ref"].removeprefix("#/").split("/"):
            target = target[unpointer(token)]
        return resolve(target, doc)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in KEEP:
            continue
        if key == "properties":
            out[key] = {name: resolve(sub, doc) for name, sub in value.items()}
        elif key in ("items", "anyOf", "oneOf") or (
                key == "additionalProperties" and isinstance(value, dict)):
            out[key] = resolve(value, doc)
        else:
            out[key] = value
    return out


def operation_schema(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    op = doc["paths"][path][method]
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in op.get("parameters") or []:
        if param["in"] != "query":
            continue  # path parameters are part of the route
        properties[param["name"]] = resolve(param.get("schema", {}), doc)
        if param.get("required"):
            required.append(param["name"])
    body = (op.get("requestBody") or {}).get("content") or {}
    media = body.get("application/x-www-form-urlencoded") or body.get("application/json")
    if media is not None:
        schema = resolve(media["schema"], doc)
        properties.update(schema.get("properties", {}))
        required += schema.get("required", [])
    return {"type": "object", "properties": properties, "required": sorted(set(required)),
            "additionalProperties": False}


def main(folder: str) -> None:
    source = Path(folder)
    docs = {name: json.loads(lzma.decompress((source / name).read_bytes()))
            for name in (V1, V2)}
    digests = {name: hashlib.sha256(lzma.decompress((source / name).read_bytes())).hexdigest()
               for name in (V1, V2)}
    overlay = json.loads((source / "overlay.json").read_text())
    for name, doc in docs.items():
        apply_overlay(doc, [op for op in overlay["operations"] if op["doc"] == name])
    operations: dict[str, Any] = {}
    for method, path, name in OPERATIONS:
        doc = docs[name]
        operations[f"{method.upper()} {path}"] = {
            "body": "json" if name == V2 else "form",
            "schema": operation_schema(doc, method, path),
        }
    # The v2 meter event stream lives on its own host and is not in the v2 document; its
    # events follow POST /v2/billing/meter_events (synchronous v2 events), at most 100 per
    # request. The 100-character identifier limit is the v1 schema's: Tally sends the same
    # identifiers on both paths.
    event = copy.deepcopy(operation_schema(docs[V2], "post", "/v2/billing/meter_events"))
    event["properties"]["identifier"]["maxLength"] = 100
    operations["POST /v2/billing/meter_event_stream"] = {
        "body": "json",
        "derived_from": "POST /v2/billing/meter_events",
        "schema": {"type": "object", "additionalProperties": False, "required": ["events"],
                   "properties": {"events": {"type": "array", "maxItems": 100,
                                             "items": event}}},
    }
    out = {
        "about": "Generated by testkit/scripts/extract_stripe_openapi.py; see STRIPE_OPENAPI.md.",
        "documents": {
            V1: {"info_version": docs[V1]["info"]["version"], "sha256": digests[V1]},
            V2: {"info_version": docs[V2]["info"]["version"], "sha256": digests[V2]},
        },
        "overlay": overlay["about"],
        "api_version": "2026-09-30.endive",
        "operations": operations,
    }
    OUT.write_text(json.dumps(out, indent=None, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(operations)} operations)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/stripe-openapi")
