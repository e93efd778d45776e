"""The OpenAI surface through the gateway, spoken to by the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import GatewayServer

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def direct(gateway: GatewayServer, model: str = "chat-small") -> openai.OpenAI:
    """A client that talks to the first replica of `model` directly, bypassing the gateway."""
    spec = gateway.settings.catalog.get(model)
    assert spec is not None
    return openai.OpenAI(base_url=f"{spec.endpoints[0]}/v1", api_key="unused", max_retries=0)


def test_chat_completion_matches_the_engine_exactly(gateway: GatewayServer, api_key: str) -> None:
    via = gateway.client(api_key).chat.completions.create(
        model="chat-small", messages=HELLO, max_tokens=7, seed=3
    )
    with direct(gateway) as engine:
        raw = engine.chat.completions.create(
            model="chat-small", messages=HELLO, max_tokens=7, seed=3
        )
    assert via.model == "chat-small"
    assert via.choices[0].message.content == raw.choices[0].message.content
    assert via.usage is not None and raw.usage is not None
    assert via.usage.completion_tokens == 7
    assert via.usage.prompt_tokens == raw.usage.prompt_tokens
    assert via.choices[0].finish_reason == "length"


def test_stream_without_include_usage_hides_the_usage_chunk(
    gateway: GatewayServer, api_key: str
) -> None:
    chunks = list(
        gateway.client(api_key).chat.completions.create(
            model="chat-small", messages=HELLO, max_tokens=5, stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "no usage-only chunk may reach this client"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_with_include_usage_ends_with_exact_usage(
    gateway: GatewayServer, api_key: str
) -> None:
    chunks = list(
        gateway.client(api_key).chat.completions.create(
            model="chat-small",
            messages=HELLO,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 6
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 6


def test_stream_text_equals_non_stream_text(gateway: GatewayServer, api_key: str) -> None:
    client = gateway.client(api_key)
    whole = client.chat.completions.create(
        model="chat-small", messages=HELLO, max_tokens=9, seed=11
    )
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="chat-small", messages=HELLO, max_tokens=9, seed=11, stream=True
        )
        if c.choices
    )
    assert streamed == whole.choices[0].message.content


def test_completions_endpoint(gateway: GatewayServer, api_key: str) -> None:
    result = gateway.client(api_key).completions.create(
        model="chat-small", prompt="Once upon a time", max_tokens=4
    )
    assert result.choices[0].text
    assert result.usage is not None and result.usage.completion_tokens == 4


def test_streamed_completions(gateway: GatewayServer, api_key: str) -> None:
    chunks = list(
        gateway.client(api_key).completions.create(
            model="chat-small",
            prompt="Once upon a time",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_embeddings(gateway: GatewayServer, api_key: str) -> None:
    result = gateway.client(api_key).embeddings.create(
        model="embed-small", input=["first text", "second text"]
    )
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 384
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0


def test_models_list_shows_only_allowed_models(gateway: GatewayServer) -> None:
    all_key = gateway.create_key()["key"]
    chat_only = gateway.create_key(models=["chat-small"])["key"]
    assert {m.id for m in gateway.client(all_key).models.list()} == {"chat-small", "embed-small"}
    assert [m.id for m in gateway.client(chat_only).models.list()] == ["chat-small"]
    with pytest.raises(openai.NotFoundError):
        gateway.client(chat_only).models.retrieve("embed-small")
    assert gateway.client(chat_only).models.retrieve("chat-small").id == "chat-small"


def test_responses_carry_a_request_id(gateway: GatewayServer, api_key: str) -> None:
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {api_key}"},
        json={"model": "chat-small", "messages": HELLO, "max_tokens": 1},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"].startswith("req_")


def test_served_name_is_mapped_both_ways(
    gateway_factory: object, simulators: dict[str, list[object]], api_key: str
) -> None:
    """A catalogue name can differ from the engine's served name; clients only see ours."""
    from tests.conftest import catalog_for

    catalog = catalog_for(simulators)  # type: ignore[arg-type]
    endpoints = catalog["models"][0]["endpoints"]
    catalog["models"].append(
        {"name": "assistant", "served_name": "chat-small", "endpoints": endpoints}
    )
    gw = gateway_factory(catalog=catalog)  # type: ignore[operator]
    key = gw.create_key()["key"]
    client = gw.client(key)
    whole = client.chat.completions.create(model="assistant", messages=HELLO, max_tokens=2)
    assert whole.model == "assistant"
    chunks = list(
        client.chat.completions.create(model="assistant", messages=HELLO, max_tokens=2, stream=True)
    )
    assert {c.model for c in chunks} == {"assistant"}
