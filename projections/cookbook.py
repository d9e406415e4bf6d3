"""The finance cookbook's queries, read from `cookbook.sql`: the one copy that
docs/finance.md shows and the tests run, so the document cannot drift from tested SQL."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

COOKBOOK = Path(__file__).resolve().parent / "cookbook.sql"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    sql: str


@cache
def recipes() -> dict[str, Recipe]:
    """name -> recipe, in file order."""
    found: dict[str, Recipe] = {}
    for chunk in COOKBOOK.read_text().split("-- name: ")[1:]:
        name, _, body = chunk.partition("\n")
        lines = body.strip().splitlines()
        description = [ln.removeprefix("--").strip() for ln in lines if ln.startswith("--")]
        sql = "\n".join(ln for ln in lines if not ln.startswith("--")).strip()
        found[name.strip()] = Recipe(name.strip(), " ".join(description), sql)
    return found
