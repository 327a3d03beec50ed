"""The JSON API against its own OpenAPI document: schemathesis generates requests from the spec
(a bounded number per operation), and every response must be documented, match its schema, and
never be a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

EXAMPLES_PER_OPERATION = 25


def test_api_matches_its_openapi_document(app) -> None:
    # Built by hand rather than with schemathesis.pytest.from_fixture, which does not run on pytest 9.
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /api/v1/predict", "GET /api/v1/model", "GET /metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            # The schema cannot say "bytes of a JPEG, PNG or DICOM", so generated files are random
            # bytes: a documented 415/422 is right for them, not the 2xx this check expects.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()
