"""Engine behaviour a gateway depends on: queueing, aborts, failures, health and metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from tests.simulator.conftest import Sim


def _chat(max_tokens: int, *, stream: bool = False, ignore_eos: bool = True) -> dict[str, object]:
    return {
        "model": "chat-small",
        "messages": [{"role": "user", "content": "Tell me a long story."}],  # 6 + 4 + 3 = 13
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": ignore_eos,
    }


def _events(lines: Iterator[str], count: int) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line)
            if len(out) == count:
                break
    return out


def test_health_follows_the_healthy_flag(sim: Sim) -> None:
    assert sim.http.get("/health").status_code == 200
    sim.configure(healthy=False)
    assert sim.http.get("/health").status_code == 503


def test_metrics_count_tokens_requests_and_latencies(sim: Sim) -> None:
    before = sim.metrics()
    r = sim.http.post("/v1/chat/completions", json=_chat(7))
    assert r.status_code == 200
    after = sim.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    assert delta("vllm:prompt_tokens_total") == 13
    assert delta("vllm:generation_tokens_total") == 7
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 6
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert after[("vllm:num_requests_running", frozenset())] == 0
    assert after[("vllm:num_requests_waiting", frozenset())] == 0
    assert after[("vllm:kv_cache_usage_perc", frozenset())] == 0


def test_max_num_seqs_queues_the_rest_in_waiting(sim: Sim) -> None:
    sim.configure(max_num_seqs=2, tokens_per_s=20)
    with ExitStack() as stack:
        for _ in range(4):
            req = sim.http.build_request(
                "POST", "/v1/chat/completions", json=_chat(200, stream=True)
            )
            resp = sim.http.send(req, stream=True)
            stack.callback(resp.close)
            assert resp.status_code == 200
        sim.wait_stats(lambda s: s["running"] == 2 and s["waiting"] == 2)
        assert sim.metric("vllm:num_requests_running") == 2
        assert sim.metric("vllm:num_requests_waiting") == 2
        assert 0 < sim.metric("vllm:kv_cache_usage_perc") < 1
    stats = sim.wait_stats(lambda s: s["running"] == 0 and s["waiting"] == 0)
    assert stats["aborted"] == 4
    assert stats["started"] == 2


def test_a_queued_request_starts_when_a_slot_frees_and_ttft_includes_the_wait(sim: Sim) -> None:
    sim.configure(max_num_seqs=1, tokens_per_s=50)  # 10 tokens = 0.18 s after the first
    before = sim.metrics()
    started = time.monotonic()
    with ExitStack() as stack:
        first = sim.http.send(
            sim.http.build_request("POST", "/v1/chat/completions", json=_chat(10, stream=True)),
            stream=True,
        )
        stack.callback(first.close)
        sim.wait_stats(lambda s: s["running"] == 1)
        second = sim.http.post("/v1/chat/completions", json=_chat(1))
        first.read()
    assert second.status_code == 200
    assert time.monotonic() - started >= 0.18
    after = sim.metrics()
    slow = ("vllm:time_to_first_token_seconds_bucket", frozenset({("le", "0.1")}))
    count = ("vllm:time_to_first_token_seconds_count", frozenset())
    assert after[count] - before.get(count, 0) == 2
    # The queued request waited for the whole first stream, so only one TTFT is under 0.1 s.
    assert after[slow] - before.get(slow, 0) == 1


def test_client_disconnect_aborts_a_stream(sim: Sim) -> None:
    sim.configure(tokens_per_s=50)
    with sim.http.stream("POST", "/v1/chat/completions", json=_chat(1000, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert len(_events(r.iter_lines(), 4)) == 4  # role + 3 tokens
    stats = sim.wait_stats(lambda s: s["aborted"] == 1 and s["running"] == 0)
    assert stats["finished"] == 0
    assert 3 <= stats["tokens_generated"] < 100
    assert sim.metric("vllm:request_success_total", finished_reason="abort") >= 1
    time.sleep(0.1)  # generation really stopped: no token appears after the abort
    assert sim.stats()["tokens_generated"] == stats["tokens_generated"]


def test_client_disconnect_aborts_a_non_streaming_request(sim: Sim) -> None:
    sim.configure(tokens_per_s=50)
    with pytest.raises(httpx.ReadTimeout):
        sim.http.post("/v1/chat/completions", json=_chat(1000), timeout=0.2)
    stats = sim.wait_stats(lambda s: s["aborted"] == 1 and s["running"] == 0)
    assert stats["finished"] == 0
    assert 1 <= stats["tokens_generated"] < 100


def test_disconnect_while_waiting_leaves_the_queue(sim: Sim) -> None:
    sim.configure(max_num_seqs=1, tokens_per_s=20)
    with sim.http.stream("POST", "/v1/chat/completions", json=_chat(100, stream=True)):
        with pytest.raises(httpx.ReadTimeout):
            sim.http.post("/v1/chat/completions", json=_chat(5), timeout=0.1)
        stats = sim.wait_stats(lambda s: s["waiting"] == 0 and s["aborted"] == 1)
        assert stats["running"] == 1
        assert stats["started"] == 1


def test_full_waiting_queue_answers_503(sim: Sim) -> None:
    sim.configure(max_num_seqs=1, max_waiting=0, tokens_per_s=20)
    with sim.http.stream("POST", "/v1/chat/completions", json=_chat(100, stream=True)):
        sim.wait_stats(lambda s: s["running"] == 1)
        r = sim.http.post("/v1/chat/completions", json=_chat(5))
    assert r.status_code == 503
    assert r.json()["error"]["code"] == 503
    assert sim.stats()["overloaded"] == 1


def test_fail_after_tokens_breaks_the_stream_after_k_tokens(sim: Sim) -> None:
    sim.configure(fail_after_tokens=3)
    events: list[str] = []

    def read_all() -> None:
        with sim.http.stream("POST", "/v1/chat/completions", json=_chat(50, stream=True)) as r:
            assert r.status_code == 200
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    with pytest.raises(httpx.RemoteProtocolError):
        read_all()
    assert len(events) == 1 + 3  # role, then exactly 3 tokens, then the connection is cut
    assert not any("[DONE]" in e for e in events)
    stats = sim.wait_stats(lambda s: s["dropped"] == 1 and s["running"] == 0)
    assert stats["tokens_generated"] == 3


def test_fail_after_tokens_cuts_a_non_streaming_response(sim: Sim) -> None:
    sim.configure(fail_after_tokens=2)
    with pytest.raises(httpx.RemoteProtocolError):
        sim.http.post("/v1/chat/completions", json=_chat(10))
    assert sim.wait_stats(lambda s: s["dropped"] == 1)["running"] == 0


def test_fail_after_tokens_beyond_the_output_changes_nothing(sim: Sim) -> None:
    sim.configure(fail_after_tokens=10)
    r = sim.http.post("/v1/chat/completions", json=_chat(5))
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 5


def test_hang_accepts_but_never_answers(sim: Sim) -> None:
    sim.configure(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        sim.http.post("/v1/chat/completions", json=_chat(5), timeout=0.2)
    assert sim.stats()["hung"] == 1
    sim.configure(hang=False)
    assert sim.http.post("/v1/chat/completions", json=_chat(5)).status_code == 200


def test_ttft_and_decode_rate_shape_latency(sim: Sim) -> None:
    sim.configure(ttft_ms=100, tokens_per_s=100)
    started = time.monotonic()
    r = sim.http.post("/v1/chat/completions", json=_chat(11))
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert 0.2 <= elapsed < 1.0  # 100 ms to the first token + 10 intervals of 10 ms


def test_sim_reset_zeroes_stats(sim: Sim) -> None:
    sim.http.post("/v1/chat/completions", json=_chat(2))
    assert sim.stats()["finished"] == 1
    sim.http.post("/sim/reset").raise_for_status()
    stats = sim.stats()
    assert stats["finished"] == stats["received"] == stats["tokens_generated"] == 0
