"""A tenant the pipeline has never heard of is not unknown to the plan catalog: with no
usage and no subscription it is on the catalog's default plan (as the worker counts it and
billing bills it), so its feature gates and entitlements come from that plan. Only an
invalid tenant id is refused (400)."""

from __future__ import annotations

import httpx

from tests.api.conftest import ApiServer


def test_a_brand_new_tenant_is_on_the_default_plan(api: ApiServer) -> None:
    client = httpx.Client(base_url=api.url, timeout=10, headers=api.headers())
    gate = client.get("/v1/tenants/brand-new/features/priority_support")
    assert gate.status_code == 200, gate.text
    assert gate.json() == {"tenant": "brand-new", "feature": "priority_support",
                           "plan_id": "free", "enabled": False}
    use = {"tenant": "brand-new", "meter": "api_calls", "quantity": "1000"}
    check = client.post("/v1/entitlements/check", json=use)
    assert check.status_code == 200, check.text
    assert (check.json()["allowed"], check.json()["limit"], check.json()["plan_id"]) == (
        True, "1000", "free")
    consume = client.post("/v1/entitlements/consume", json={**use, "id": "first-use"})
    assert consume.status_code == 200, consume.text
    assert consume.json()["used"] == "0"
    over = client.post("/v1/entitlements/consume", json={**use, "quantity": "1",
                                                          "id": "second-use"})
    assert over.status_code == 402  # the default plan's hard limit holds for it too


def test_an_invalid_tenant_id_is_400_not_the_default_plan(api: ApiServer) -> None:
    client = httpx.Client(base_url=api.url, timeout=10, headers=api.headers())
    bad = "bad%20tenant"
    assert client.get(f"/v1/tenants/{bad}/features/priority_support").status_code == 400
    for path in ("/v1/entitlements/check", "/v1/entitlements/consume"):
        answer = client.post(path, json={"tenant": "bad tenant", "meter": "api_calls"})
        assert answer.status_code == 400, answer.text


def test_the_openapi_document_says_what_a_new_tenant_is(api: ApiServer) -> None:
    paths = httpx.get(f"{api.url}/openapi.json", timeout=10).json()["paths"]
    for path, method in (("/v1/tenants/{tenant}/features/{feature}", "get"),
                         ("/v1/entitlements/check", "post"),
                         ("/v1/entitlements/consume", "post")):
        assert "default plan" in paths[path][method]["description"], path
