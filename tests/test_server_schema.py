"""Schemathesis against /openapi.json: generated requests never cause a 5xx, and every response matches
the schema (documented status code, content type, body shape)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from conftest import write_tiny_checkpoint
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks as openapi_checks
from test_server_support import AUTH, MODEL, settings_for

import clipserve
from clipserve.api import create_app
from clipserve.api.settings import Limits

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
]


def _app():
    # Built at import: schemathesis generates the test cases from the schema at collection time.
    state = Path(tempfile.mkdtemp(prefix="clipserve-schema-"))
    model = clipserve.load(str(write_tiny_checkpoint(state / "tiny-clip")))
    return create_app(settings_for(state, limits=Limits(max_items=8, request_timeout_s=30)), {MODEL: model})


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


# Loading models at run time is left out: generated strings would be load attempts of arbitrary paths.
@pytest.mark.slow
@schema.exclude(path_regex="^/admin/models").parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case) -> None:
    case.headers = {**(case.headers or {}), **AUTH}
    response = case.call()
    case.validate_response(response, checks=CHECKS)
