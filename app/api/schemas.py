"""Request schemas for the OpenAI endpoints: just enough to reject bad input with a clear 422
before it reaches a GPU. Unknown fields pass through untouched to the engine, as with vLLM."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

_MAX_N = 128
_MAX_TOKENS = 10_000_000


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Annotated[str, Field(min_length=1, max_length=256)]


class _Generation(_Base):
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=_MAX_TOKENS)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=_MAX_N)] | None = 1
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=_MAX_TOKENS)] | None = None

    def completion_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[StrictInt], Field(min_length=1)]
    | Annotated[list[list[StrictInt]], Field(min_length=1)]
)


class CompletionRequest(_Generation):
    prompt: Prompt

    def completion_cap(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Base):
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1, le=65536)] | None = None
