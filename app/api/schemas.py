"""Request schemas for the OpenAI endpoints: just enough to reject bad input with a clear 422
before it reaches a GPU. Unknown fields pass through untouched to the engine, as with vLLM."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

_MAX_N = 128
_MAX_TOKENS = 10_000_000


def _integral(value: Any) -> Any:
    """JSON has one number type: ``16.0`` is the integer 16, as JSON Schema's ``integer`` (the
    published schema) and the engines' own validation read it; ``1.5``, ``"16"`` and ``true``
    stay invalid."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Last in Annotated (after any Field bounds), so the schema keeps minimum/maximum.
_INTEGRAL = BeforeValidator(_integral)
Integer = Annotated[StrictInt, _INTEGRAL]
TokenCount = Annotated[StrictInt, Field(ge=1, le=_MAX_TOKENS), _INTEGRAL]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Annotated[str, Field(min_length=1, max_length=256)]


class _Generation(_Base):
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    n: Annotated[StrictInt, Field(ge=1, le=_MAX_N), _INTEGRAL] | None = 1
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: TokenCount | None = None

    def completion_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[Integer], Field(min_length=1)]
    | Annotated[list[list[Integer]], Field(min_length=1)]
)


class CompletionRequest(_Generation):
    prompt: Prompt

    def completion_cap(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Base):
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1, le=65536), _INTEGRAL] | None = None
