"""Property-based fuzzing of the web API from its own OpenAPI schema (schemathesis):
whatever a client sends, the answer is never a server error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from hat.config import ServeConfig
from hat.index import Index
from hat.serve import create_app

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES_PER_OPERATION = 25
LIMITS = ServeConfig(max_query_chars=40, max_k=5, max_upload_bytes=20_000, max_pixels=50_000)


@pytest.fixture(scope="module")
def api_schema(collection_index):
    with Index.open(collection_index) as index:
        yield schemathesis.openapi.from_asgi("/openapi.json", create_app(index, LIMITS))


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 4
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, response.text[:300])

        check()
