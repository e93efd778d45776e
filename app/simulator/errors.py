"""vLLM-shaped API errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

vLLM names the type after the exception class (BadRequestError, NotFoundError, ...) and puts
the HTTP status in `code`; validation errors append "(parameter=..., value=...)" to the message.
"""

from __future__ import annotations

from typing import Any

import orjson

_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """An error answered to the client as vLLM would, then the request is over."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        value: Any = None,
        err_type: str | None = None,
        annotate: bool = True,
    ) -> None:
        pairs = (("parameter", param), ("value", value)) if annotate else ()
        extras = [f"{k}={v}" for k, v in pairs if v is not None]
        full = f"{message} ({', '.join(extras)})" if extras else message
        super().__init__(full)
        self.status = status
        self.message = full
        self.param = param
        self.err_type = err_type or _TYPES.get(status, "APIError")

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.err_type,
                    "param": self.param,
                    "code": self.status,
                }
            }
        )


def bad_request(message: str, *, param: str | None = None, value: Any = None) -> ApiError:
    return ApiError(400, message, param=param, value=value)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", annotate=False)


def prompt_too_long(max_model_len: int, prompt_tokens: int) -> ApiError:
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, your "
        f"request has {prompt_tokens} input tokens. Please reduce the length of the input "
        "messages.",
        param="input_tokens",
        value=prompt_tokens,
    )


def max_tokens_too_large(max_model_len: int, prompt_tokens: int, max_tokens: int) -> ApiError:
    return bad_request(
        f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
        f"maximum context length is {max_model_len} tokens and your request has "
        f"{prompt_tokens} input tokens ({max_tokens} > {max_model_len} - {prompt_tokens}).",
        param="max_tokens",
        value=max_tokens,
    )


def embedding_input_too_long(max_model_len: int, prompt_tokens: int) -> ApiError:
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, you "
        f"requested {prompt_tokens} tokens in the input for embedding generation. Please "
        "reduce the length of the input.",
    )


def overloaded(waiting: int) -> ApiError:
    return ApiError(
        503,
        f"The server is overloaded: {waiting} requests are already waiting. Retry later.",
    )


def simulated_failure(status: int) -> ApiError:
    return ApiError(status, "Simulated engine failure (fail_rate).")
