"""The tokens file and the authorization rules every server shares (runtime/credentials.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runtime.credentials import (
    SCOPES,
    Credential,
    CredentialsError,
    Tokens,
    authorize,
    load_tokens,
    scope_to_publish,
)

BILLING = {"service": "svc/billing", "tenants": ["acme", "globex"],
           "scopes": ["usage", "subscriptions", "quota"]}


def tokens(**entries: Any) -> Tokens:
    return Tokens.parse(entries)


def test_a_token_finds_its_credential_and_an_unknown_one_finds_none() -> None:
    store = tokens(**{"tok-billing": BILLING,
                      "tok-all": {"service": "svc/x", "tenants": "*", "scopes": ["quota"]}})
    found = store.authenticate("Bearer tok-billing")
    assert found is not None and found.service == "svc/billing"
    assert found.tenants == frozenset({"acme", "globex"})
    assert store.authenticate("bearer  tok-all ") == store.lookup("tok-all")
    for header in (None, "", "Bearer", "Bearer tok-billin", "Basic tok-billing", "tok-billing"):
        assert store.authenticate(header) is None


def test_authorize_allows_a_tenant_and_scope_of_the_token() -> None:
    credential = Credential.model_validate(BILLING)
    assert authorize(credential, "acme", "usage") == ()
    assert authorize(credential, "globex", "quota") == ()


def test_authorize_names_each_rule_broken() -> None:
    credential = Credential.model_validate({**BILLING, "scopes": ["quota"]})
    assert [d.rule for d in authorize(credential, "initech", "quota")] == ["tenant_not_allowed"]
    assert [d.rule for d in authorize(credential, "acme", "usage")] == ["scope_missing"]
    both = authorize(credential, "initech", "subscriptions")
    assert [d.rule for d in both] == ["tenant_not_allowed", "scope_missing"]
    assert "'initech'" in both[0].message
    assert "'subscriptions'" in both[1].message and "this token has: quota" in both[1].message


def test_every_tenant_is_written_as_a_star() -> None:
    credential = Credential.model_validate({**BILLING, "tenants": "*"})
    assert authorize(credential, "anyone", "usage") == ()


def test_each_event_type_needs_its_scope() -> None:
    assert scope_to_publish("tally.usage.v1") == "usage"
    assert scope_to_publish("tally.subscription.plan_changed.v1") == "subscriptions"
    assert scope_to_publish("tally.plans.v1") is None


def test_future_scopes_read_and_admin_are_accepted() -> None:
    store = tokens(api={"service": "svc/api", "tenants": "*", "scopes": ["read", "admin"]})
    credential = store.lookup("api")
    assert credential is not None and credential.scopes == {"read", "admin"}
    assert set(SCOPES) == {"usage", "subscriptions", "quota", "read", "admin"}


def test_the_old_form_is_refused_with_each_entry_in_the_new_form() -> None:
    with pytest.raises(CredentialsError) as refused:
        Tokens.parse({"tok-secret-1": "svc/api-gateway", "tok-secret-2": BILLING}, "t.json")
    message = str(refused.value)
    assert "old form" in message
    line = next(li for li in message.splitlines() if "svc/api-gateway" in li)
    entry = json.loads(line.split(": ", 1)[1])
    assert entry == {"service": "svc/api-gateway", "tenants": "*",
                     "scopes": ["usage", "subscriptions"]}
    assert "tok-secret" not in message  # tokens are secrets: never in an error (or a log)


@pytest.mark.parametrize(("entry", "says"), [
    ({**BILLING, "tenants": []}, "non-empty list"),
    ({**BILLING, "tenants": ["*"]}, '"tenants": "*"'),
    ({**BILLING, "tenants": "acme"}, "non-empty list"),
    ({**BILLING, "tenants": ["bad tenant"]}, "tenant id"),
    ({**BILLING, "scopes": []}, "scopes"),
    ({**BILLING, "scopes": "usage"}, "list of scopes"),
    ({**BILLING, "scopes": ["write"]}, "'usage', 'subscriptions', 'quota', 'read' or 'admin'"),
    ({**BILLING, "service": ""}, "service"),
    ({**BILLING, "admin": True}, "admin"),
    ({"tenants": "*", "scopes": ["usage"]}, "service"),
])
def test_an_invalid_entry_is_refused_naming_the_problem(entry: dict[str, Any],
                                                        says: str) -> None:
    with pytest.raises(CredentialsError, match="entry 1") as refused:
        Tokens.parse({"tok-secret": entry})
    assert says in str(refused.value)
    assert "tok-secret" not in str(refused.value)


def test_every_problem_of_the_file_is_reported() -> None:
    with pytest.raises(CredentialsError) as refused:
        Tokens.parse({"a": {**BILLING, "tenants": []}, "b": BILLING,
                      "c": {**BILLING, "scopes": ["nope"]}, " d": BILLING})
    message = str(refused.value)
    assert "entry 1" in message and "entry 3" in message and "entry 4" in message
    assert "entry 2" not in message


def test_a_tokens_file_is_read_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tok": BILLING}))
    assert load_tokens(path).lookup("tok") is not None
    assert len(load_tokens(None)) == 0
    with pytest.raises(CredentialsError, match="no such tokens file"):
        load_tokens(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(CredentialsError, match="not JSON"):
        load_tokens(path)
    path.write_text("[]")
    with pytest.raises(CredentialsError, match="expected an object"):
        load_tokens(path)
