"""Schemathesis against the served OpenAPI document: every operation, with a token that may
do everything, answers without a 5xx, with a documented status and content type, and a
body that matches its schema.

The Stripe double serves the checkout and portal sessions (STRIPE_API_BASE), so those
operations reach a Stripe that validates their parameters too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from runtime.settings import Settings
from tests.api.conftest import ApiServer


@pytest.fixture
def served(api_settings: Settings, api_factory: Callable[[Settings], ApiServer],
           stripe_double_url: str) -> Iterator[ApiServer]:
    settings = api_settings.model_copy(update={"stripe_api_key": "sk_test_tally",
                                               "stripe_api_base": stripe_double_url})
    yield api_factory(settings)


def test_every_operation_answers_within_its_documented_schema(served: ApiServer) -> None:
    # schemathesis's pytest plugin does not run under this pytest (9): each operation's
    # cases are drawn with its Hypothesis strategy here instead.
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:

        @hypothesis_settings(max_examples=25, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=served.url, headers=served.headers("tok-admin"),
                checks=[not_a_server_error, status_code_conformance,
                        content_type_conformance, response_schema_conformance])

        try:
            run()
        except Exception as e:  # every operation is tried; all failures are reported
            failures.append(f"{operation.label}: {e}"[:3000])
    assert not failures, "\n\n".join(failures)
