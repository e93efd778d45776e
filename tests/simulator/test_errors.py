"""Error answers in vLLM's shapes: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.simulator.conftest import Sim, _start_sim

CHAT = {"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]}


def _error(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = dict(body["error"])
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    return err


def test_unknown_model_is_404_like_vllm(sim: Sim) -> None:
    r = sim.http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    err = _error(r, 404)
    assert err["message"] == "The model `gpt-9` does not exist."
    assert err["type"] == "NotFoundError"
    assert err["param"] == "model"


def test_max_tokens_beyond_context_is_400_with_vllm_wording(sim: Sim) -> None:
    sim.configure(max_model_len=100)
    # "hi" = 1 token + 4 per message + 3 primer = 8 prompt tokens.
    r = sim.http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 93})
    err = _error(r, 400)
    assert err["message"] == (
        "'max_tokens' or 'max_completion_tokens' is too large: 93. This model's maximum "
        "context length is 100 tokens and your request has 8 input tokens (93 > 100 - 8). "
        "(parameter=max_tokens, value=93)"
    )
    assert err["type"] == "BadRequestError"
    assert err["param"] == "max_tokens"


def test_max_tokens_exactly_filling_the_context_is_accepted(sim: Sim) -> None:
    sim.configure(max_model_len=100)
    r = sim.http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 92})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 8


def test_prompt_alone_filling_the_context_is_400(sim: Sim) -> None:
    sim.configure(max_model_len=10)
    r = sim.http.post("/v1/completions", json={"prompt": "a b c d e f g h i j"})
    err = _error(r, 400)
    assert err["message"].startswith(
        "This model's maximum context length is 10 tokens. However, your request has 10 "
        "input tokens. Please reduce the length of the input messages."
    )
    assert err["param"] == "input_tokens"


def test_invalid_json_is_400(sim: Sim) -> None:
    r = sim.http.post(
        "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    err = _error(r, 400)
    assert err["type"] == "BadRequestError"
    assert "JSON" in str(err["message"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": "5"}, "max_tokens"),
        ({**CHAT, "n": 0}, "n"),
        ({"model": "chat-small"}, "messages"),
    ],
)
def test_invalid_fields_are_400_naming_the_parameter(
    sim: Sim, body: dict[str, object], param: str
) -> None:
    r = sim.http.post("/v1/chat/completions", json=body)
    assert _error(r, 400)["param"] == param


def test_stream_options_without_stream_is_400(sim: Sim) -> None:
    r = sim.http.post(
        "/v1/chat/completions",
        json={**CHAT, "stream_options": {"include_usage": True}},
    )
    assert _error(r, 400)["message"] == "Stream options can only be defined when `stream=True`."


def test_unknown_fields_are_ignored(sim: Sim) -> None:
    r = sim.http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "frobnicate": True})
    assert r.status_code == 200


def test_embeddings_on_a_chat_model_is_not_served(sim: Sim) -> None:
    r = sim.http.post("/v1/embeddings", json={"model": "chat-small", "input": "x"})
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}


def test_chat_on_an_embedding_model_is_not_served(embed_sim: Sim) -> None:
    r = embed_sim.http.post("/v1/chat/completions", json={**CHAT, "model": "embed-small"})
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}


@pytest.fixture(scope="module")
def completion_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    sim = _start_sim(
        tmp_path_factory.mktemp("sim"), "base", "--model", "base-lm", "--kind", "completion"
    )
    yield sim
    sim.stop()


def test_chat_on_a_completion_only_model_is_400_no_chat_template(completion_only: Sim) -> None:
    r = completion_only.http.post("/v1/chat/completions", json={**CHAT, "model": "base-lm"})
    assert "chat template" in str(_error(r, 400)["message"])
    ok = completion_only.http.post(
        "/v1/completions",
        json={"model": "base-lm", "prompt": "x", "max_tokens": 1},
    )
    assert ok.status_code == 200


def test_fail_rate_one_answers_every_request_with_fail_status(sim: Sim) -> None:
    sim.configure(fail_rate=1.0, fail_status=502)
    statuses = [sim.http.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
    for r in statuses:
        assert _error(r, 502)["message"].startswith("Simulated engine failure")
    assert sim.stats()["failed"] == 3


def test_fail_rate_zero_point_five_fails_about_half_reproducibly(sim: Sim) -> None:
    sim.configure(fail_rate=0.5, seed=7)
    codes = [
        sim.http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code
        for _ in range(40)
    ]
    assert set(codes) == {200, 500}
    assert 8 <= codes.count(500) <= 32


def test_runtime_config_rejects_bad_values_and_read_only_fields(sim: Sim) -> None:
    r = sim.http.post("/sim/config", json={"ttft_ms": "slow", "model": "other"})
    err = _error(r, 400)
    assert "ttft_ms" in str(err["message"])
    assert "'model' cannot change at runtime" in str(err["message"])
    r = sim.http.post("/sim/config", json={"fail_rate": 2})
    assert "fail_rate" in str(_error(r, 400)["message"])
    assert sim.http.get("/sim/config").json()["ttft_ms"] == 0
