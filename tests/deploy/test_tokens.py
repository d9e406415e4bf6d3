"""The tokens files shipped in deploy/ are in the form the servers accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.credentials import Tokens, authorize

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*tokens*.json")), ids=str)
def test_every_tokens_file_in_deploy_loads(path: Path) -> None:
    assert len(Tokens.load(path)) > 0


def test_the_demo_token_publishes_for_the_demo_tenants_only() -> None:
    tokens = Tokens.load(DEPLOY / "demo" / "ingest-tokens.json")
    demo = tokens.lookup((DEPLOY / "demo" / "demo-token").read_text().strip())
    assert demo is not None and demo.service == "svc/demo"
    for scope in ("usage", "subscriptions", "quota"):
        assert authorize(demo, "tenant-01", scope) == ()
    assert [d.rule for d in authorize(demo, "tenant-99", "usage")] == ["tenant_not_allowed"]
