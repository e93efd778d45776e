"""Prompt-size estimates made before a request is sent (the engine reports the exact count
afterwards). Used to bill a stream that was cut off before the engine reported usage, and to
reserve token budget up front."""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4.0
PER_MESSAGE_OVERHEAD = 4  # role markers of a typical chat template
PER_REQUEST_OVERHEAD = 3


def _text_tokens(value: Any) -> int:
    if isinstance(value, str):
        return max(1, round(len(value) / CHARS_PER_TOKEN)) if value else 0
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        return sum(_text_tokens(v) for v in value)
    if isinstance(value, dict):
        return _text_tokens(value.get("text") or value.get("content") or "")
    return 0


def estimate_prompt_tokens(payload: dict[str, Any]) -> int:
    """Rough prompt size of a chat, completion or embedding request body."""
    if "messages" in payload and isinstance(payload["messages"], list):
        total = PER_REQUEST_OVERHEAD
        for msg in payload["messages"]:
            if isinstance(msg, dict):
                total += PER_MESSAGE_OVERHEAD + _text_tokens(msg.get("content"))
        return total
    if "prompt" in payload:
        return _text_tokens(payload["prompt"])
    return _text_tokens(payload.get("input"))
