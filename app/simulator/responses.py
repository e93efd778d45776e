"""Response bodies in vLLM's OpenAI shapes: whole JSON documents and SSE events.

Stream events are assembled from per-request byte templates because they are built once per
token; everything else goes through orjson.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import orjson

from app.simulator.config import SimulatorConfig
from app.simulator.generation import ChoicePlan

DONE = b"data: [DONE]\n\n"
_NULL = b"null"


def request_id(prefix: str) -> str:
    """vLLM-style id: prefix and 32 hex digits (not cryptographic; ids only need to differ)."""
    return f"{prefix}-{random.getrandbits(128):032x}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def chat_completion(
    rid: str, created: int, model: str, plans: Sequence[ChoicePlan], prompt_tokens: int
) -> bytes:
    choices: list[dict[str, Any]] = [
        {
            "index": p.index,
            "message": {
                "role": "assistant",
                "content": "".join(p.pieces),
                "refusal": None,
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": p.finish_reason,
            "stop_reason": None,
        }
        for p in plans
    ]
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, sum(p.tokens for p in plans)),
            "prompt_logprobs": None,
        }
    )


def text_completion(
    rid: str, created: int, model: str, plans: Sequence[ChoicePlan], prompt_tokens: int
) -> bytes:
    choices: list[dict[str, Any]] = [
        {
            "index": p.index,
            "text": "".join(p.pieces),
            "logprobs": None,
            "finish_reason": p.finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        for p in plans
    ]
    return orjson.dumps(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, sum(p.tokens for p in plans)),
        }
    )


class StreamEvents:
    """SSE events of one streamed request (`chat.completion.chunk` or `text_completion`)."""

    __slots__ = ("_chat", "_head", "_tail")

    def __init__(self, chat: bool, rid: str, created: int, model: str) -> None:
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._chat = chat
        self._head = (
            b'data: {"id":"' + rid.encode() + b'","object":"' + obj + b'","created":'
            + str(created).encode() + b',"model":' + orjson.dumps(model) + b',"choices":['
        )  # fmt: skip
        self._tail = b"]}\n\n"

    def role(self, index: int) -> bytes:
        """The first chat event of a choice: the assistant role with empty content."""
        return (
            self._head + b'{"index":' + str(index).encode()
            + b',"delta":{"role":"assistant","content":""},"logprobs":null,'
            b'"finish_reason":null}' + self._tail
        )  # fmt: skip

    def token(self, index: int, text: str, finish_reason: str | None) -> bytes:
        reason = _NULL if finish_reason is None else b'"' + finish_reason.encode() + b'"'
        content = orjson.dumps(text)
        if self._chat:
            body = b',"delta":{"content":' + content + b'},"logprobs":null,"finish_reason":'
        else:
            body = b',"text":' + content + b',"logprobs":null,"finish_reason":'
        return (
            self._head + b'{"index":' + str(index).encode() + body + reason
            + b',"stop_reason":null}' + self._tail
        )  # fmt: skip

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return (
            self._head
            + b"],"
            + orjson.dumps({"usage": usage(prompt_tokens, completion_tokens)})[1:]
            + b"\n\n"
        )


def embedding_list(
    rid: str, created: int, model: str, data: list[Any], prompt_tokens: int
) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "list",
            "created": created,
            "model": model,
            "data": [
                {"index": i, "object": "embedding", "embedding": vec} for i, vec in enumerate(data)
            ],
            "usage": usage(prompt_tokens, 0),
        }
    )


def model_list(config: SimulatorConfig, created: int) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": config.model,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": config.model,
                    "parent": None,
                    "max_model_len": config.max_model_len,
                    "permission": [
                        {
                            "id": request_id("modelperm"),
                            "object": "model_permission",
                            "created": created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
            ],
        }
    )


def now_s() -> int:
    return int(time.time())
