"""Reading request parameters the way Stripe reads them.

Form bodies (``a[b][0][c]=x``) become nested dicts and lists with string leaves; the
``get_*`` readers convert a leaf and refuse a bad one with Stripe's error. Which
parameters an endpoint accepts is Stripe's OpenAPI document's to say
(:mod:`stripe_testkit.openapi`), checked before a handler runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from urllib.parse import parse_qsl

from stripe_testkit.errors import JSON, ApiError, missing, no_such, unsupported

__all__ = [
    "created_filter",
    "get_bool",
    "get_decimal",
    "get_dict",
    "get_enum",
    "get_int",
    "get_metadata",
    "get_str",
    "page",
    "parse_form",
    "reject",
]

_MAX_METADATA_KEYS: Final = 50


def parse_form(body: str) -> JSON:
    """Parse a Stripe form body (``a[b][0][c]=x``) into nested dicts and lists.

    Every leaf stays a string, as on the wire; handlers convert what they read.
    """
    root: JSON = {}
    for raw_key, value in parse_qsl(body, keep_blank_values=True):
        path = _split_key(raw_key)
        node = root
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ApiError(400, f"Invalid object: {raw_key}", param=path[0])
            node = child
        # `expand[]=a&expand[]=b` is the bracket-only array form some clients send.
        leaf = path[-1] if path[-1] else str(len(node))
        node[leaf] = value
    listified = _listify(root)
    assert isinstance(listified, dict)
    return listified


def _split_key(raw_key: str) -> list[str]:
    head, bracket, rest = raw_key.partition("[")
    if not bracket or not rest.endswith("]"):
        return [raw_key]
    return [head, *rest[:-1].split("][")]


def _listify(node: Any) -> Any:
    """Turn dicts keyed ``"0".."n"`` (how the SDK encodes lists) back into lists."""
    if not isinstance(node, dict):
        return node
    converted = {key: _listify(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


def get_str(params: JSON, key: str, *, required: bool = False) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise missing(key)
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"Invalid string: {key}", code="parameter_invalid_string", param=key)
    return value


def get_int(params: JSON, key: str, *, required: bool = False) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise missing(key)
        return None
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise ApiError(400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=key)


def get_bool(params: JSON, key: str) -> bool | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if value in (True, "true"):
        return True
    if value in (False, "false"):
        return False
    raise ApiError(400, f"Invalid boolean: {value}", param=key)


def get_decimal(params: JSON, key: str) -> Decimal | None:
    value = get_str(params, key)
    if value is None:
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        raise ApiError(
            400, f"Invalid decimal: {value}", code="parameter_invalid_string", param=key
        )
    return number


def get_enum(params: JSON, key: str, choices: Sequence[str], default: str) -> str:
    value = get_str(params, key)
    if value is None:
        return default
    if value not in choices:
        raise ApiError(400, f"Invalid {key}: must be one of {', '.join(choices)}", param=key)
    return value


def get_dict(params: JSON, key: str) -> JSON | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, list):  # a dict whose keys all happened to be digits
        value = {str(index): item for index, item in enumerate(value)}
    if not isinstance(value, dict):
        raise ApiError(400, f"Invalid object: {key}", param=key)
    return value


def get_metadata(params: JSON) -> dict[str, str]:
    """Read ``metadata`` with Stripe's limits; an empty value unsets a key, as in Stripe."""
    raw = get_dict(params, "metadata") or {}
    metadata: dict[str, str] = {}
    for key, value in raw.items():
        param = f"metadata[{key}]"
        if not isinstance(value, str):
            raise ApiError(400, f"Invalid string: {param}", param=param)
        if len(key) > 40:
            raise ApiError(400, "Metadata keys can have up to 40 characters.", param=param)
        if len(value) > 500:
            raise ApiError(400, "Metadata values can have up to 500 characters.", param=param)
        if value:
            metadata[key] = value
    if len(metadata) > _MAX_METADATA_KEYS:
        raise ApiError(400, "Metadata can have up to 50 keys.", param="metadata")
    return metadata


def reject(params: JSON, *names: str) -> None:
    for name in names:
        if name in params:
            raise unsupported(name)


def created_filter(params: JSON) -> Callable[[JSON], bool]:
    """Stripe's ``created`` list filter: an exact timestamp or ``gt/gte/lt/lte`` bounds."""
    raw = params.get("created")
    if raw is None or raw == "":
        return lambda _obj: True
    if isinstance(raw, str):
        exact = get_int(params, "created")
        return lambda obj: obj["created"] == exact
    bounds = get_dict(params, "created") or {}
    checks = {
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }
    active: list[tuple[Callable[[int, int], bool], int]] = []
    for op in bounds:
        if op not in checks:
            raise ApiError(
                400,
                f"Received unknown parameter: created[{op}]",
                code="parameter_unknown",
                param=f"created[{op}]",
            )
        value = get_int(bounds, op)
        assert value is not None
        active.append((checks[op], value))
    return lambda obj: all(check(obj["created"], bound) for check, bound in active)


def page(items: Sequence[JSON], params: JSON, url: str) -> JSON:
    """One page of a Stripe list, newest first as given; cursors are object ids."""
    limit = get_int(params, "limit")
    limit = 10 if limit is None else limit
    if not 1 <= limit <= 100:
        raise ApiError(
            400,
            "Invalid limit: must be between 1 and 100",
            code="parameter_invalid_integer",
            param="limit",
        )
    ids = [item["id"] for item in items]
    after, before = get_str(params, "starting_after"), get_str(params, "ending_before")
    if after is not None:
        if after not in ids:
            raise no_such("object", after, "starting_after")
        start = ids.index(after) + 1
        data, has_more = items[start : start + limit], len(items) > start + limit
    elif before is not None:
        if before not in ids:
            raise no_such("object", before, "ending_before")
        end = ids.index(before)
        data, has_more = items[max(0, end - limit) : end], end - limit > 0
    else:
        data, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": list(data), "has_more": has_more, "url": url}
