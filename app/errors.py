"""OpenAI-shaped errors: every failure the gateway reports is one of these.

Raised anywhere in request handling and rendered by one exception handler, so the shape
(`{"error": {"message", "type", "param", "code"}}`) and status never drift between routes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import Response


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, extra_headers: Mapping[str, str] | None = None) -> Response:
        headers = {**self.headers, **(extra_headers or {})}
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=headers,
        )


def unauthorized(message: str, code: str = "invalid_api_key") -> APIError:
    return APIError(
        401,
        message,
        type_="authentication_error",
        code=code,
        headers={"www-authenticate": "Bearer"},
    )


def forbidden(message: str, code: str = "model_not_allowed") -> APIError:
    return APIError(403, message, type_="permission_error", code=code)


def not_found(message: str, code: str = "model_not_found", param: str | None = "model") -> APIError:
    return APIError(404, message, type_="invalid_request_error", code=code, param=param)


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def unprocessable(message: str, param: str | None = None) -> APIError:
    return APIError(422, message, code="invalid_value", param=param)


def too_large(limit: int) -> APIError:
    return APIError(
        413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large"
    )


def unavailable(message: str, retry_after_s: float | None = None) -> APIError:
    headers = {"retry-after": str(max(1, round(retry_after_s)))} if retry_after_s else None
    return APIError(
        503, message, type_="service_unavailable", code="no_healthy_upstream", headers=headers
    )


def bad_gateway(message: str) -> APIError:
    return APIError(502, message, type_="upstream_error", code="upstream_error")


def gateway_timeout(message: str) -> APIError:
    return APIError(504, message, type_="timeout", code="upstream_timeout")


def internal_error() -> APIError:
    return APIError(
        500, "The gateway hit an internal error.", type_="server_error", code="internal_error"
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error answer, for the OpenAPI schema (``APIError.body``)."""

    error: ErrorDetail


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route for the error statuses it can answer."""
    return {
        status: {"model": ErrorBody, "description": "OpenAI-shaped error"} for status in statuses
    }
