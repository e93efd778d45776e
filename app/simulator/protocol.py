"""Parse and validate OpenAI request bodies into the few fields the simulator acts on.

Unknown fields are ignored, as vLLM does; known fields of the wrong type get vLLM's 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from app.simulator import errors
from app.simulator.config import SimulatorConfig
from app.simulator.tokens import chat_prompt_tokens, count_tokens, message_text

Endpoint = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt: its token count and a key that makes greedy output repeatable."""

    tokens: int
    key: str


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    endpoint: Endpoint
    prompts: tuple[Prompt, ...]
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    ignore_eos: bool
    min_tokens: int
    seed: int | None
    temperature: float | None

    @property
    def prompt_tokens(self) -> int:
        return sum(p.tokens for p in self.prompts)


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    inputs: tuple[Prompt, ...]
    encoding_format: Literal["float", "base64"]
    dimensions: int | None

    @property
    def prompt_tokens(self) -> int:
        return sum(p.tokens for p in self.inputs)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.bad_request(f"JSON decode error: {exc}") from None
    if not isinstance(data, dict):
        raise errors.bad_request("Input should be a valid dictionary (the request body)")
    return data


def check_model(data: dict[str, Any], config: SimulatorConfig) -> None:
    model = data.get("model")
    if model is not None and model != config.model:
        raise errors.model_not_found(str(model))


def parse_generate(
    data: dict[str, Any], endpoint: Endpoint, config: SimulatorConfig
) -> GenerateRequest:
    """Validate a chat or completion request, including vLLM's context-length checks."""
    check_model(data, config)
    prompts: tuple[Prompt, ...]
    if endpoint == "chat":
        prompts = (_chat_prompt(data.get("messages")),)
        max_tokens = _opt_int(data, "max_completion_tokens", minimum=1)
        if max_tokens is None:
            max_tokens = _opt_int(data, "max_tokens", minimum=1)
    else:
        prompts = _completion_prompts(data.get("prompt"))
        max_tokens = _opt_int(data, "max_tokens", minimum=1)
    stream = _opt_bool(data, "stream") or False
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise errors.bad_request("Stream options can only be defined when `stream=True`.")
        if not isinstance(options, dict):
            raise errors.bad_request("stream_options must be an object", param="stream_options")
        include_usage = _opt_bool(options, "include_usage") or False
    for prompt in prompts:
        if prompt.tokens >= config.max_model_len:
            raise errors.prompt_too_long(config.max_model_len, prompt.tokens)
        if max_tokens is not None and prompt.tokens + max_tokens > config.max_model_len:
            raise errors.max_tokens_too_large(config.max_model_len, prompt.tokens, max_tokens)
    temperature = data.get("temperature")
    if temperature is not None and not _is_number(temperature):
        raise errors.bad_request("temperature must be a number", param="temperature")
    return GenerateRequest(
        endpoint=endpoint,
        prompts=prompts,
        max_tokens=max_tokens,
        n=_opt_int(data, "n", minimum=1) or 1,
        stream=stream,
        include_usage=include_usage,
        stop=_stop(data.get("stop")),
        ignore_eos=_opt_bool(data, "ignore_eos") or False,
        min_tokens=_opt_int(data, "min_tokens", minimum=0) or 0,
        seed=_opt_int(data, "seed"),
        temperature=None if temperature is None else float(temperature),
    )


def parse_embedding(data: dict[str, Any], config: SimulatorConfig) -> EmbeddingRequest:
    check_model(data, config)
    inputs = _completion_prompts(data.get("input"), field="input")
    for item in inputs:
        if item.tokens > config.max_model_len:
            raise errors.embedding_input_too_long(config.max_model_len, item.tokens)
    fmt = data.get("encoding_format") or "float"
    if fmt != "float" and fmt != "base64":
        raise errors.bad_request(
            "encoding_format must be 'float' or 'base64'", param="encoding_format", value=fmt
        )
    return EmbeddingRequest(
        inputs=inputs,
        encoding_format="base64" if fmt == "base64" else "float",
        dimensions=_opt_int(data, "dimensions", minimum=1),
    )


def _chat_prompt(messages: Any) -> Prompt:
    if not isinstance(messages, list) or not messages:
        raise errors.bad_request("messages must be a non-empty list", param="messages")
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise errors.bad_request(
                "each message must be an object with a string 'role'", param="messages"
            )
        try:
            texts.append(message_text(message.get("content")))
        except TypeError as exc:
            raise errors.bad_request(str(exc), param="messages") from None
    return Prompt(tokens=chat_prompt_tokens(messages), key="\x00".join(texts))


def _completion_prompts(prompt: Any, field: str = "prompt") -> tuple[Prompt, ...]:
    if isinstance(prompt, str):
        return (Prompt(count_tokens(prompt), prompt),)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return (Prompt(len(prompt), repr(prompt)),)
        if all(isinstance(p, str) for p in prompt):
            return tuple(Prompt(count_tokens(p), p) for p in prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return tuple(Prompt(len(p), repr(p)) for p in prompt)
    raise errors.bad_request(
        f"{field} must be a string, a list of strings, or token ids", param=field
    )


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    raise errors.bad_request("stop must be a string or a list of strings", param="stop")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _opt_int(data: dict[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # like vLLM (pydantic's int): 16.0 is 16
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.bad_request(f"{key} must be an integer", param=key, value=value)
    if minimum is not None and value < minimum:
        raise errors.bad_request(
            f"{key} must be at least {minimum}, got {value}.", param=key, value=value
        )
    return value


def _opt_bool(data: dict[str, Any], key: str) -> bool | None:
    value = data.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise errors.bad_request(f"{key} must be a boolean", param=key, value=value)
