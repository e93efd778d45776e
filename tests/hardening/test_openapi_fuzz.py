"""Schemathesis against the gateway's own OpenAPI schema, over real HTTP.

Every operation the running gateway publishes at ``GET /openapi.json`` is called with
generated requests (valid by the schema, and deliberately invalid ones) under four
identities: a valid API key, the admin token, no credentials and a garbage key. Whatever the
identity and the input, the gateway must never answer 5xx, and every answer must be one the
schema documents: its status code, its content type and its body.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_TOKEN, GatewayServer

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# What the gateway publishes; test_schema_lists_every_operation keeps this list honest.
OPERATIONS = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/v1/usage"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("GET", "/admin/keys/{key_id}"),
    ("DELETE", "/admin/keys/{key_id}"),
    ("GET", "/admin/pool"),
    ("POST", "/admin/pool/splits/{name}/reset"),
    ("GET", "/admin/customers/{customer}/limits"),
    ("PUT", "/admin/customers/{customer}/limits"),
    ("GET", "/admin/usage"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
IDENTITIES = ["api_key", "admin_token", "no_key", "garbage_key"]
MODELS = ["chat-small", "embed-small"]
GARBAGE = "Bearer sy-AAAAAAAAAAAA-not-a-real-secret"


@pytest.fixture(scope="module")
def schema(module_gateway: GatewayServer) -> schemathesis.BaseSchema:
    """The schema as the running gateway serves it, aimed at that gateway."""
    loaded = schemathesis.openapi.from_url(f"{module_gateway.url}/openapi.json", timeout=10)
    loaded.config.update(base_url=module_gateway.url)
    loaded.config.generation.update(with_security_parameters=False, allow_x00=True)
    return loaded


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def authorization(identity: str, api_key: str) -> str | None:
    return {
        "api_key": f"Bearer {api_key}",
        "admin_token": f"Bearer {ADMIN_TOKEN}",
        "no_key": None,
        "garbage_key": GARBAGE,
    }[identity]


def test_schema_lists_every_operation(schema: schemathesis.BaseSchema) -> None:
    published = {
        (method.upper(), path)
        for path, item in schema.raw_schema["paths"].items()
        for method in item
    }
    assert published == set(OPERATIONS)


def fuzz(
    schema: schemathesis.BaseSchema,
    session: requests.Session,
    operation: tuple[str, str],
    header: str | None,
    mode: GenerationMode,
    data: st.DataObject,
) -> None:
    method, path = operation
    case: Any = data.draw(schema[path][method].as_strategy(generation_mode=mode))
    if isinstance(case.body, dict) and "model" in case.body and data.draw(st.booleans()):
        # Half of the bodies name a model of the catalogue, so they get past the 404 and
        # reach the limiter, the router and an engine.
        case.body["model"] = data.draw(st.sampled_from(MODELS))
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if header is not None:
        case.headers["Authorization"] = header
    response = case.call_and_validate(session=session, checks=CHECKS, timeout=15)
    if mode is GenerationMode.POSITIVE:
        # What the schema calls valid, the gateway's validation must accept too.
        assert response.status_code != 422, (case.body, response.text)


# Operations with inputs that can be made invalid (a body, a bounded or required parameter);
# the others accept anything a client can send.
CONSTRAINED = [
    ("GET", "/v1/usage"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/admin/keys"),
    ("PUT", "/admin/customers/{customer}/limits"),
    ("GET", "/admin/usage"),
]


def cases(operations: list[tuple[str, str]]) -> list[Any]:
    return [
        pytest.param(operation, identity, id=f"{' '.join(operation)} as {identity}")
        for operation in operations
        for identity in IDENTITIES
    ]


FUZZ_SETTINGS = settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize(("operation", "identity"), cases(OPERATIONS))
@FUZZ_SETTINGS
@given(data=st.data())
def test_valid_requests_get_documented_answers(
    schema: schemathesis.BaseSchema,
    session: requests.Session,
    module_key: str,
    operation: tuple[str, str],
    identity: str,
    data: st.DataObject,
) -> None:
    header = authorization(identity, module_key)
    fuzz(schema, session, operation, header, GenerationMode.POSITIVE, data)


@pytest.mark.parametrize(("operation", "identity"), cases(CONSTRAINED))
@FUZZ_SETTINGS
@given(data=st.data())
def test_invalid_requests_get_documented_answers(
    schema: schemathesis.BaseSchema,
    session: requests.Session,
    module_key: str,
    operation: tuple[str, str],
    identity: str,
    data: st.DataObject,
) -> None:
    header = authorization(identity, module_key)
    fuzz(schema, session, operation, header, GenerationMode.NEGATIVE, data)
