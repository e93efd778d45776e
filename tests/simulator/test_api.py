"""The OpenAI API as the official `openai` client sees it: shapes and exact usage counts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.simulator.conftest import Sim

# Token rule (app/simulator/tokens.py): "You are terse." = 4, "Hello, world!" = 4;
# chat adds 4 per message and 3 for the reply primer: 4 + 4 + 2 * 4 + 3 = 19.
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, world!"},
]
MESSAGES_TOKENS = 19


@pytest.fixture
def client(sim: Sim) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
def embed_client(embed_sim: Sim) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{embed_sim.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def test_models_list_names_the_served_model_with_its_context_length(
    client: openai.OpenAI,
) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["chat-small"]
    assert models[0].owned_by == "vllm"
    assert models[0].model_extra is not None
    assert models[0].model_extra["max_model_len"] == 4096
    assert models[0].model_extra["root"] == "chat-small"


def test_chat_completion_counts_usage_exactly(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="chat-small", messages=MESSAGES, max_tokens=7)
    assert resp.object == "chat.completion"
    assert resp.model == "chat-small"
    assert resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        MESSAGES_TOKENS,
        7,
        MESSAGES_TOKENS + 7,
    )


def test_chat_without_max_tokens_ends_naturally_at_output_tokens(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="chat-small", messages=MESSAGES)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 16


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="chat-small", messages=MESSAGES, max_completion_tokens=3
    )
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 3


def test_ignore_eos_generates_exactly_max_tokens(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="chat-small", messages=MESSAGES, max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 40
    assert resp.choices[0].finish_reason == "length"


def test_chat_stream_sends_role_then_one_event_per_token_then_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="chat-small",
        messages=MESSAGES,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content = [c for c in chunks[1:] if c.choices]
    assert len(content) == 5
    assert [c.choices[0].finish_reason for c in content] == [None] * 4 + ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (MESSAGES_TOKENS, 5)


def test_chat_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="chat-small", messages=MESSAGES, max_tokens=4, stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert len(chunks) == 1 + 4


def test_streamed_text_equals_the_non_streamed_text_for_a_seed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "chat-small", "messages": MESSAGES, "seed": 42}
    full = client.chat.completions.create(max_tokens=9, **kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(max_tokens=9, stream=True, **kwargs)
        if c.choices
    )
    assert streamed == full


def test_completion_counts_prompt_tokens_of_text(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="chat-small", prompt="The quick brown fox", max_tokens=5)
    assert resp.object == "text_completion"
    assert resp.choices[0].text
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (4, 5)


def test_completion_with_n_choices_multiplies_generated_tokens(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="chat-small", prompt="Once upon", max_tokens=6, n=3)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 18


def test_completion_of_a_prompt_list_answers_each_prompt(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="chat-small", prompt=["a b", "c d e"], max_tokens=2)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 4)


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="chat-small",
            prompt="The quick brown fox",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None, None, "length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == 4


def test_embeddings_are_unit_norm_deterministic_and_counted(
    embed_client: openai.OpenAI,
) -> None:
    first = embed_client.embeddings.create(model="embed-small", input=["a b c", "hello"])
    again = embed_client.embeddings.create(model="embed-small", input="hello")
    assert [d.index for d in first.data] == [0, 1]
    assert all(len(d.embedding) == 384 for d in first.data)
    assert math.isclose(math.fsum(v * v for v in first.data[0].embedding), 1.0, rel_tol=1e-5)
    assert again.data[0].embedding == pytest.approx(first.data[1].embedding, abs=1e-6)
    assert first.data[0].embedding != first.data[1].embedding
    assert (first.usage.prompt_tokens, first.usage.total_tokens) == (4, 4)


def test_embeddings_float_format_over_raw_http(embed_sim: Sim) -> None:
    r = embed_sim.http.post(
        "/v1/embeddings",
        json={"model": "embed-small", "input": [[1, 2, 3]], "encoding_format": "float"},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert body["data"][0]["object"] == "embedding"
    assert len(body["data"][0]["embedding"]) == 384
    assert body["usage"]["prompt_tokens"] == 3
