from pathlib import Path

import pytest

from schemas.errors import CatalogError
from schemas.export import JSON_DIR, render
from schemas.plans import default_catalog_path, load_catalog, parse_catalog


def test_seed_catalog_has_the_plan_document_figures() -> None:
    catalog = load_catalog(default_catalog_path())
    assert [p.name for p in catalog.plans.values()] == ["Free", "Starter", "Pro", "Enterprise"]
    assert catalog.plans["starter"].monthly_fee_cents == 2900
    assert catalog.plans["pro"].meters["api_calls"].included == 100000
    assert catalog.plans["free"].meters["executions"].hard_limit == 100
    assert catalog.plans["enterprise"].meters["tokens"].included is None  # unlimited


def test_catalog_errors_list_every_problem() -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog({
            "default_plan": "gold",
            "meters": {"api_calls": {"aggregation": "median"}},
            "plans": {"free": {"name": "Free", "meters": {"api_calls": {"included": -1}}}},
        })
    message = str(info.value)
    assert "aggregation" in message and "included" in message


def test_catalog_rejects_a_plan_naming_an_unknown_meter() -> None:
    with pytest.raises(CatalogError, match="unknown meter 'gpu'"):
        parse_catalog({"default_plan": "free", "meters": {},
                       "plans": {"free": {"name": "Free", "meters": {"gpu": {}}}}})


def test_missing_catalog_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no such file"):
        load_catalog(tmp_path / "nope.toml")


def test_committed_json_schemas_are_current() -> None:
    for name, text in render().items():
        path = JSON_DIR / name
        assert path.exists(), f"{name} missing: run `make schemas`"
        assert path.read_text() == text, f"{name} is stale: run `make schemas`"
