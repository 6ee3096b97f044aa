"""schemathesis against the server's own OpenAPI schema: generated requests, valid and not, never
get a 5xx, and every answer (status, content type, body) is what the schema says."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_openai_server import start_server

schema = schemathesis.pytest.from_fixture("served_schema")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# A schema-violating body past --max-request-bytes (16,385 input messages: 65 MB) is refused unread, with
# 413: a rejection too, which schemathesis's default list of rejecting statuses leaves out
CONFIG = SchemathesisConfig.from_str("""
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
""")


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    server, uv, url = start_server(tiny_checkpoint("llama"), "--served-model-name", "tiny")
    yield url
    uv.should_exit = True
    server.engine.shutdown()


@pytest.fixture
def served_schema(served):
    return schemathesis.openapi.from_url(f"{served}/openapi.json", config=CONFIG)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_server_answers_as_its_schema_says(case, served):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "tiny"  # the served name, so that requests reach the engine
    if case.path == "/v1/responses" and isinstance(case.body, dict) and case.body.get("max_output_tokens") is None:
        case.body["max_output_tokens"] = 16  # (else each valid one runs to the context: 28 -> ~8 s here)
    case.call_and_validate(base_url=served, checks=CHECKS, timeout=60)
