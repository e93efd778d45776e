"""Property tests of the parsers that see untrusted bytes: request bodies (the hot path of
app/api/openai.py and the schemas of app/api/schemas.py), the engines' server-sent events
(app/proxy/sse.py) and the model catalogue (app/catalog.py).

Each parser, given anything at all, either returns its result or raises its one documented
error (an APIError with the right status, ValueError, CatalogError) — never anything else;
what can be written and read back comes back equal.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.types import Message

from app.api.openai import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    parse_json,
    read_body,
    upstream_body,
    validate,
)
from app.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.catalog import Catalog, CatalogError, ModelSpec, load_catalog, parse_catalog
from app.errors import APIError
from app.proxy.sse import SSESplitter, inspect


def outcome(fn: Callable[..., T], *args: Any) -> tuple[T | None, Exception | None]:
    """What ``fn(*args)`` returned, or what it raised: the tests then say which is allowed."""
    try:
        return fn(*args), None
    except Exception as exc:
        return None, exc


T = TypeVar("T")
PROPERTY = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- JSON values and request bodies ---------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Values that sit on the edges of the request schemas' rules.
edgy_numbers = st.sampled_from([0, 1, -1, 128, 129, 10**7, 10**7 + 1, 10**18, 2.0, 1.5, -0.0])
field_values = json_values | edgy_numbers | st.just("16") | st.integers()
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"])},
        optional={"content": st.text(max_size=20) | st.none() | json_values},
    )
    | json_values,
    max_size=3,
)
request_payloads = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=300) | json_values,
        "messages": messages | json_values,
        "prompt": json_values | st.lists(st.integers(), min_size=1, max_size=3),
        "input": json_values,
        "n": field_values,
        "max_tokens": field_values,
        "max_completion_tokens": field_values,
        "stream": field_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": field_values})
        | json_values,
        "temperature": field_values,
        "top_p": field_values,
        "dimensions": field_values,
        "encoding_format": st.sampled_from(["float", "base64", "hex"]) | json_values,
    },
).flatmap(
    lambda known: st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
        lambda extra: {**extra, **known}
    )
)


@PROPERTY
@given(body=st.binary(max_size=200) | json_values.map(orjson.dumps))
def test_any_body_is_a_json_object_or_a_400(body: bytes) -> None:
    payload, error = outcome(parse_json, body)
    if error is None:
        assert isinstance(payload, dict)
    else:
        assert isinstance(error, APIError), error
        assert (error.status, error.code) == (400, "invalid_json")


@PROPERTY
@given(depth=st.integers(min_value=1, max_value=100_000), opener=st.sampled_from([b"[", b'{"a":']))
def test_deeply_nested_json_is_parsed_or_refused_with_a_400(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    body = b'{"model": "m", "x": ' + opener * depth + b"1" + closer * depth + b"}"
    payload, error = outcome(parse_json, body)
    if error is None:
        assert payload is not None
        assert payload["model"] == "m"
    else:
        assert isinstance(error, APIError), error
        assert error.status == 400


@PROPERTY
@given(
    endpoint=st.sampled_from([CHAT, COMPLETIONS, EMBEDDINGS]),
    payload=request_payloads,
)
def test_any_payload_validates_or_is_a_422_naming_the_field(
    endpoint: str, payload: dict[str, Any]
) -> None:
    parsed, error = outcome(validate, endpoint, payload)
    if error is None:
        assert getattr(parsed, "model", None) == payload["model"]
    else:
        assert isinstance(error, APIError), error
        assert (error.status, error.code) == (422, "invalid_value")
        assert error.param is not None
        assert error.param.split(".")[0] in {*payload, "model", "messages", "prompt", "input"}


@PROPERTY
@given(
    value=st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
)
def test_n_is_accepted_exactly_when_it_is_a_whole_number_from_1_to_128(value: float) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": value}
    whole = float(value).is_integer() and 1 <= value <= 128
    parsed, error = outcome(validate, CHAT, payload)
    if error is not None:
        assert isinstance(error, APIError), error
        assert (error.status, error.param) == (422, "n")
        assert not whole
    else:
        assert whole
        assert isinstance(parsed, ChatCompletionRequest)
        assert parsed.n == value
        assert type(parsed.n) is int


@PROPERTY
@given(value=st.sampled_from(["16", True, False, None, [16], {"n": 16}, 0, -1, 10**18, 0.5]))
def test_max_tokens_must_be_a_whole_number_from_1_to_10_million(value: Any) -> None:
    payload = {"model": "m", "prompt": "hi", "max_tokens": value}
    if value is None:
        parsed = validate(COMPLETIONS, payload)
        assert isinstance(parsed, CompletionRequest)
        assert parsed.max_tokens is None
        return
    with pytest.raises(APIError) as caught:
        validate(COMPLETIONS, payload)
    assert (caught.value.status, caught.value.param) == (422, "max_tokens")


names = st.text(min_size=1, max_size=256)
valid_chat = st.fixed_dictionaries(
    {
        "model": names,
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "developer", "user", "assistant"]),
                    "content": st.text(max_size=50) | st.none(),
                }
            ),
            min_size=1,
            max_size=4,
        ),
    },
    optional={
        "n": st.integers(1, 128),
        "max_tokens": st.integers(1, 10_000_000),
        "max_completion_tokens": st.integers(1, 10_000_000),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "user": st.text(max_size=20),
        "logit_bias": st.dictionaries(st.text(max_size=5), st.integers(-100, 100), max_size=3),
    },
)


@PROPERTY
@given(request=valid_chat)
def test_valid_chat_requests_survive_json_and_validation_unchanged(
    request: dict[str, Any],
) -> None:
    payload = parse_json(orjson.dumps(request))
    assert payload == request
    parsed = validate(CHAT, payload)
    assert isinstance(parsed, ChatCompletionRequest)
    assert parsed.model_dump(exclude_unset=True, mode="json") == request


@PROPERTY
@given(request=valid_chat, served=st.text(min_size=1, max_size=30))
def test_the_engine_gets_the_request_with_its_own_model_name_and_usage_on(
    request: dict[str, Any], served: str
) -> None:
    spec = ModelSpec(name="public-name", served_name=served)
    stream = bool(request.get("stream"))
    sent = orjson.loads(upstream_body(dict(request), spec, stream))
    assert sent["model"] == served
    if stream:
        assert sent["stream_options"]["include_usage"] is True
        assert {k: v for k, v in sent["stream_options"].items() if k != "include_usage"} == {}
    rest = {k: v for k, v in sent.items() if k not in {"model", "stream_options"}}
    assert rest == {k: v for k, v in request.items() if k not in {"model", "stream_options"}}


@PROPERTY
@given(
    embedding_input=st.text(max_size=30)
    | st.lists(st.text(max_size=10), min_size=1, max_size=4)
    | st.lists(st.integers(0, 2**31), min_size=1, max_size=4)
    | st.lists(st.lists(st.integers(0, 2**31), min_size=0, max_size=3), min_size=1, max_size=3),
    dimensions=st.none() | st.integers(1, 65536),
)
def test_valid_embedding_requests_validate(embedding_input: Any, dimensions: int | None) -> None:
    request: dict[str, Any] = {"model": "e", "input": embedding_input}
    if dimensions is not None:
        request["dimensions"] = dimensions
    parsed = validate(EMBEDDINGS, parse_json(orjson.dumps(request)))
    assert isinstance(parsed, EmbeddingRequest)
    assert parsed.model_dump(exclude_unset=True, mode="json") == request


# -- the request body reader ----------------------------------------------------------------


def receiver(chunks: list[bytes]) -> Any:
    messages: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> Message:
        return messages.pop(0)

    return receive


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)] or [b""]


@PROPERTY
@given(
    body=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=20),
    limit=st.integers(1024, 2048),
    declare=st.booleans(),
)
def test_the_body_reader_returns_the_body_in_any_chunking_or_refuses_it_past_the_limit(
    body: bytes, cuts: list[int], limit: int, declare: bool
) -> None:
    headers = {b"content-length": str(len(body)).encode()} if declare else {}
    read, error = outcome(asyncio.run, read_body(receiver(split(body, cuts)), headers, limit))
    if error is None:
        assert read == body
        assert len(body) <= limit
    else:
        assert isinstance(error, APIError), error
        assert error.status == 413
        assert len(body) > limit


@PROPERTY
@given(declared=st.text(max_size=25))
def test_any_content_length_header_is_harmless(declared: str) -> None:
    headers = {b"content-length": declared.encode()}
    read, error = outcome(asyncio.run, read_body(receiver([b"{}"]), headers, 1024))
    if error is None:
        assert read == b"{}"
    else:  # only a declared length over the limit is refused, before reading anything
        assert isinstance(error, APIError), error
        assert error.status == 413
        assert declared.encode().isdigit()
        assert int(declared.encode()) > 1024


# -- server-sent events ---------------------------------------------------------------------

# Streams made of the bytes that matter to the splitter, plus anything else.
sse_bytes = st.lists(
    st.sampled_from(
        [b"\n", b"\r", b"\r\n", b"\r\r\n", b"\n\n", b"data: ", b'{"a":1}', b"[DONE]", b":"]
    )
    | st.binary(max_size=8),
    max_size=40,
).map(b"".join)


def feed_all(chunks: list[bytes], max_buffer: int = 8 * 1024 * 1024) -> tuple[list[bytes], bytes]:
    splitter = SSESplitter(max_buffer)
    events: list[bytes] = []
    for chunk in chunks:
        events += splitter.feed(chunk)
    return events, splitter.pending


@PROPERTY
@given(stream=sse_bytes, cuts=st.lists(st.integers(0, 400), max_size=30))
@example(stream=b"data: a\r\r\n\n", cuts=[10])  # a CR before a CRLF cut after the CR
def test_splitting_a_stream_anywhere_yields_the_same_events(stream: bytes, cuts: list[int]) -> None:
    assert feed_all(split(stream, cuts)) == feed_all([stream])


@PROPERTY
@given(stream=sse_bytes, cuts=st.lists(st.integers(0, 400), max_size=30))
@example(stream=b"data: a\r\r\n\n", cuts=[10])
def test_events_are_whole_and_no_byte_is_lost(stream: bytes, cuts: list[int]) -> None:
    events, pending = feed_all(split(stream, cuts))
    assert b"".join(events) + pending == stream.replace(b"\r\n", b"\n")
    for event in events:
        assert event.endswith(b"\n\n")
        assert b"\n\n" not in event[:-1]
    assert b"\n\n" not in pending


def test_one_huge_event_in_small_reads_costs_linear_time() -> None:
    """An engine sending an 8 MiB event 4 KiB at a time must not stall the event loop (it
    took 17 s when every read rescanned and recopied the whole buffer)."""
    event = b"data: " + b"x" * (8 * 1024 * 1024 - 100)
    splitter = SSESplitter()
    began = time.perf_counter()
    for i in range(0, len(event), 4096):
        assert splitter.feed(event[i : i + 4096]) == []
    assert splitter.feed(b"\n\n") == [event + b"\n\n"]
    assert time.perf_counter() - began < 1.0


@PROPERTY
@given(
    stream=sse_bytes,
    cuts=st.lists(st.integers(0, 400), max_size=30),
    limit=st.integers(0, 64),
)
def test_the_splitter_buffers_at_most_its_limit_or_raises_value_error(
    stream: bytes, cuts: list[int], limit: int
) -> None:
    splitter = SSESplitter(limit)
    for chunk in split(stream, cuts):
        try:
            splitter.feed(chunk)
        except ValueError:
            assert len(splitter.pending) > limit
            return
        assert len(splitter.pending) <= limit


@PROPERTY
@given(
    event=st.binary(max_size=300)
    | sse_bytes
    | json_values.map(lambda v: b"data: " + orjson.dumps(v) + b"\n\n")
)
def test_inspecting_any_event_never_raises(event: bytes) -> None:
    info = inspect(event)
    assert info.usage is None or all(isinstance(v, int) for v in info.usage.values())


counts = st.integers(0, 10**9)


@PROPERTY
@given(
    usage=st.fixed_dictionaries(
        {"prompt_tokens": counts, "completion_tokens": counts, "total_tokens": counts}
    ),
    choices=st.sampled_from([[], [{"index": 0, "delta": {"content": "x"}}]]),
    spaced=st.booleans(),
)
def test_usage_written_by_an_engine_is_read_back(
    usage: dict[str, int], choices: list[Any], spaced: bool
) -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": choices, "usage": usage}
    data = orjson.dumps(chunk)
    if spaced:  # Python's json.dumps style, as some engines write it
        data = data.replace(b'":', b'": ')
    info = inspect(b"data: " + data + b"\n\n")
    assert info.usage == usage
    assert info.usage_only is (choices == [])
    assert info.content is bool(choices)


# -- the model catalogue --------------------------------------------------------------------

model_names = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?\Z")
endpoints = st.lists(
    st.builds(
        "{}://127.0.0.1:{}".format,
        st.sampled_from(["http", "https", "dns+http"]),
        st.integers(1, 65535),
    ),
    max_size=3,
)
model_specs = st.fixed_dictionaries(
    {"name": model_names},
    optional={
        "kind": st.sampled_from(["chat", "completion", "embedding"]),
        "endpoints": endpoints,
        "served_name": st.text(min_size=1, max_size=20),
        "max_model_len": st.integers(16, 10_000_000),
        "default_max_tokens": st.integers(1, 100_000),
        "replicas": st.integers(0, 5).flatmap(
            lambda lo: st.fixed_dictionaries(
                {"min": st.just(lo), "max": st.integers(max(lo, 1), 9)}
            )
        ),
        "routing": st.sampled_from(["round_robin", "least_outstanding", "queue_aware"]),
        "vllm_args": st.lists(st.text(max_size=10), max_size=3),
    },
)
catalogs = st.lists(model_specs, max_size=4, unique_by=lambda m: m["name"]).map(
    lambda models: {"models": models}
)


@PROPERTY
@given(data=json_values | st.dictionaries(st.text(max_size=8), json_values) | catalogs)
def test_any_catalogue_data_parses_or_raises_catalog_error(data: Any) -> None:
    catalog, error = outcome(parse_catalog, data)
    if error is None:
        assert isinstance(catalog, Catalog)
    else:
        assert isinstance(error, CatalogError), error
        assert str(error).startswith("catalog")


yaml_texts = st.lists(
    st.sampled_from(
        ["models:", "\n", " - ", "name: ", "a", "[", "]", "{", "}", ":", "&x ", "*x", "'", '"']
    )
    | st.text(max_size=10),
    max_size=30,
).map("".join)


def load_bytes(content: bytes) -> tuple[Catalog | None, Exception | None, Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.yaml"
        path.write_bytes(content)
        catalog, error = outcome(load_catalog, path)
    return catalog, error, path


@PROPERTY
@given(content=yaml_texts.map(str.encode) | st.binary(max_size=100))
def test_any_catalogue_file_loads_or_raises_catalog_error(content: bytes) -> None:
    catalog, error, path = load_bytes(content)
    if error is None:
        assert isinstance(catalog, Catalog)
    else:
        assert isinstance(error, CatalogError), error
        assert str(path) in str(error)


@pytest.mark.parametrize(
    "content",
    [b"models: " + b"[" * 3000, b"models: " + b"{a: " * 3000, b"models: [{name: \xff}]\n"],
    ids=["nested lists", "nested mappings", "not UTF-8"],
)
def test_a_hostile_catalogue_file_raises_catalog_error(content: bytes) -> None:
    _, error, path = load_bytes(content)
    assert isinstance(error, CatalogError), error
    assert str(path) in str(error)


@PROPERTY
@given(data=catalogs)
def test_a_catalogue_round_trips_through_yaml(data: dict[str, Any]) -> None:
    catalog = parse_catalog(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.yaml"
        path.write_text(yaml.safe_dump(catalog.model_dump(mode="json")), encoding="utf-8")
        assert load_catalog(path) == catalog


@pytest.mark.parametrize("usage", [None, {"prompt_tokens": 3, "completion_tokens": 0}])
def test_the_event_that_opens_a_chat_stream_is_not_a_token(usage: Any) -> None:
    """vLLM opens a chat stream with the assistant role and empty content, with usage in every
    event when a client asks for continuous usage stats: it is neither a token nor the first
    token's time."""
    choice = {"index": 0, "delta": {"role": "assistant", "content": ""}}
    role = {"id": "c", "object": "chat.completion.chunk", "choices": [choice], "usage": usage}
    token = {**role, "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    assert inspect(b"data: " + orjson.dumps(role) + b"\n\n").content is False
    assert inspect(b"data: " + orjson.dumps(token) + b"\n\n").content is True
