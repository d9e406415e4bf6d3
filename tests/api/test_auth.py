"""Who may see what: bearer tokens, their tenants and scopes."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import ApiServer

TENANT_PATHS = ["/v1/tenants/{t}/usage/current", "/v1/tenants/{t}/usage/history",
                "/v1/tenants/{t}/subscription", "/v1/tenants/{t}/invoices",
                "/v1/tenants/{t}/features/sla", "/v1/meters/api_calls/query?tenant={t}"]


@pytest.fixture
def client(api: ApiServer) -> httpx.Client:
    return httpx.Client(base_url=api.url, timeout=10)


@pytest.mark.parametrize("path", TENANT_PATHS)
def test_a_read_token_for_tenant_a_gets_403_on_tenant_b(api: ApiServer, client: httpx.Client,
                                                       path: str) -> None:
    answer = client.get(path.format(t="globex"), headers=api.headers("tok-acme"))
    assert answer.status_code == 403, answer.text
    body = answer.json()
    assert body["error"] == "forbidden"
    assert [p["rule"] for p in body["problems"]] == ["tenant_not_allowed"]


@pytest.mark.parametrize("path", TENANT_PATHS)
def test_no_token_or_an_unknown_one_gets_401(client: httpx.Client, path: str) -> None:
    assert client.get(path.format(t="acme")).status_code == 401
    answer = client.get(path.format(t="acme"), headers={"Authorization": "Bearer nope"})
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_token_without_read_gets_403_naming_the_missing_scope(
        api: ApiServer, client: httpx.Client) -> None:
    answer = client.get("/v1/tenants/acme/usage/current", headers=api.headers("tok-usage-only"))
    assert answer.status_code == 403
    assert [p["rule"] for p in answer.json()["problems"]] == ["scope_missing"]


def test_admin_views_need_the_admin_scope(api: ApiServer, client: httpx.Client) -> None:
    for path in ("/v1/admin/tenants", "/v1/admin/meters/api_calls/top",
                 "/v1/admin/meters/api_calls/trends"):
        assert client.get(path, headers=api.headers("tok-acme")).status_code == 403
        assert client.get(path, headers=api.headers("tok-admin")).status_code == 200, path


def test_unknown_tenant_and_meter_are_404(api: ApiServer, client: httpx.Client) -> None:
    answer = client.get("/v1/tenants/nobody/usage/current", headers=api.headers())
    assert answer.status_code == 404
    assert answer.json()["error"].startswith("unknown tenant 'nobody'")
    answer = client.get("/v1/meters/no_such_meter/query?tenant=acme", headers=api.headers())
    assert answer.status_code == 404
    assert answer.json()["error"].startswith("unknown meter 'no_such_meter'")
    answer = client.post("/v1/entitlements/check", headers=api.headers(),
                         json={"tenant": "acme", "meter": "no_such_meter"})
    assert answer.status_code == 404
