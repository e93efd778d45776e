"""No secret reaches a log line; the OpenAPI document describes every endpoint."""

from __future__ import annotations

import logging

import httpx
import pytest

from app.logs import RedactingFilter, redact
from tests.conftest import GatewayServer

KEY = "sy-abcdefghijkm-" + "S" * 43


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"bad key {KEY}", "S" * 43),
        ("Authorization: Bearer adm-topsecret-token", "adm-topsecret-token"),
        ("stripe key sk_live_51Habcdef123", "51Habcdef123"),
        ("restricted rk_test_abc123", "abc123"),
    ],
)
def test_secrets_are_redacted(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert "[redacted]" in redact(text)


def test_the_public_key_id_survives_redaction() -> None:
    assert "sy-abcdefghijkm-" in redact(KEY)


def test_filter_rewrites_formatted_records() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key=%s", (KEY,), None)
    RedactingFilter().filter(record)
    assert "S" * 43 not in record.getMessage()


def test_openapi_lists_the_proxied_endpoints(gateway: GatewayServer) -> None:
    doc = httpx.get(f"{gateway.url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        op = doc["paths"][path]["post"]
        assert "422" in op["responses"] and "429" in op["responses"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.split("/")[-1] in doc["components"]["schemas"]
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"])
