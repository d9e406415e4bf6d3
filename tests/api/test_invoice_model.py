"""The API's Invoice (api/models.py) and the read model's (runtime/read_models.InvoiceView)
list the same invoice columns twice. The API's is written out rather than derived from the
read model: a model built at import time (pydantic's create_model) serves the same OpenAPI
document (compared by hand: byte-identical), but is no type mypy can check the routes
against, and no reader can see its fields. This test keeps the two in step instead."""

from __future__ import annotations

import typing

from api import models
from runtime.read_models import InvoiceView

# Columns of the read model the API does not serve: how Stripe collects it, and when
# Tally stored it.
NOT_SERVED = {"collection_method", "created_at"}


def test_the_api_invoice_serves_the_read_models_columns_in_order_with_their_types() -> None:
    columns = typing.get_type_hints(InvoiceView)
    expected = {("tenant" if name == "tenant_id" else name): kind
                for name, kind in columns.items() if name not in NOT_SERVED | {"lines"}}
    served = {name: field.annotation for name, field in models.Invoice.model_fields.items()
              if name != "lines"}
    assert list(served.items()) == list(expected.items())
    assert set(NOT_SERVED) <= set(columns)  # nothing excluded that does not exist
