"""Schemathesis against the service's own OpenAPI document (issue 16): generated requests, valid
and invalid, for every operation; no answer may be a server error, and every answer must be one
the document describes (status code, content type, schema). Classical models only, a bounded
number of examples per operation: fast enough for every run. `benchmarks/fuzz_api.py` is the
long run (10,000+ cases, both modes, with and without API keys)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from service.app import create_app
from tests.conftest import fast_settings, serve

CLASSICAL = "gzip,zlib,bz2,lzma,zstd"
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    checks.unsupported_method,
]


SETTINGS = fast_settings(models=CLASSICAL, default_model="gzip", score_wait_s=5.0)
schema = schemathesis.openapi.from_dict(create_app(SETTINGS).openapi())


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    with serve(SETTINGS) as url:
        yield url


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_answers_as_documented(case: schemathesis.Case, api_url: str) -> None:
    case.call_and_validate(base_url=api_url, checks=CHECKS)
