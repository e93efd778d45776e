"""Prompt and completion lengths follow their distributions; several keys share the load."""

from __future__ import annotations

import random
import statistics

import pytest

from app.bench.workload import Dist, Key, Workload, parse_dist, parse_key
from tests.bench.conftest import base_url, run
from tests.conftest import GatewayFactory
from tests.support.procs import Proc

CHAT_TEMPLATE_TOKENS = 4 + 3  # the simulator's per-message and reply-primer tokens


@pytest.mark.parametrize(
    ("text", "dist"),
    [
        ("64", Dist("fixed", 64)),
        ("uniform:10:20", Dist("uniform", 10, 20)),
        ("normal:128:32", Dist("normal", 128, 32)),
        ("lognormal:100:50", Dist("lognormal", 100, 50)),
    ],
)
def test_distributions_parse(text: str, dist: Dist) -> None:
    assert parse_dist(text) == dist
    assert parse_dist(str(dist)) == dist


@pytest.mark.parametrize(
    "text", ["0", "x", "uniform:5", "uniform:9:3", "poisson:3:4", "normal:-1:2"]
)
def test_bad_distributions_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"uniform|mean|length|kind"):
        parse_dist(text)


@pytest.mark.parametrize(
    ("text", "mean", "std"), [("normal:200:40", 200, 40), ("lognormal:200:80", 200, 80)]
)
def test_draws_have_the_asked_mean_and_spread(text: str, mean: float, std: float) -> None:
    rng = random.Random(1)
    draws = [parse_dist(text).sample(rng) for _ in range(20_000)]
    assert abs(statistics.fmean(draws) / mean - 1) < 0.02
    assert abs(statistics.pstdev(draws) / std - 1) < 0.05
    assert min(draws) >= 1


def test_keys_and_weights_parse() -> None:
    assert parse_key("sy-abc-def") == Key("sy-abc-def")
    assert parse_key("sy-abc-def:3") == Key("sy-abc-def", 3.0)
    assert Key("sy-4kq2m8x7hb3n-secretpart").label == "sy-4kq2m8x7hb3n"
    with pytest.raises(ValueError, match="weight"):
        parse_key("k:0")


def test_the_engine_sees_the_asked_lengths(simulators: dict[str, list[Proc]]) -> None:
    workload = Workload(
        "chat-small",
        prompt_tokens=parse_dist("uniform:20:60"),
        max_tokens=parse_dist("normal:30:6"),
        ignore_eos=True,
        seed=3,
    )
    result = run(base_url(simulators["chat-small"][1]), workload, concurrency=16, requests=300)
    ok = [r for r in result.records if r.ok]
    assert len(ok) == 300
    # The simulator counts tokens exactly: what it reports is what the workload asked for.
    assert all(r.prompt_tokens == r.asked_prompt + CHAT_TEMPLATE_TOKENS for r in ok)
    assert all(r.completion_tokens == r.asked_max_tokens for r in ok)
    prompts = [r.asked_prompt for r in ok]
    outputs = [r.completion_tokens for r in ok]
    assert min(prompts) >= 20
    assert max(prompts) <= 60
    assert abs(statistics.fmean(prompts) - 40) < 2.5  # s.e. of the mean: 11.8 / sqrt(300) = 0.7
    assert abs(statistics.fmean(outputs) - 30) < 1.2  # s.e. 0.35
    assert abs(statistics.pstdev(outputs) - 6) < 1.0


def test_several_keys_share_the_load_round_robin_or_by_weight(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory()
    a, b, c = (gw.create_key(customer=f"cus_{n}")["key"] for n in "abc")
    url = f"{gw.url}/v1"
    even = run(url, Workload("chat-small", keys=(Key(a), Key(b))), concurrency=4, requests=40)
    assert even.summary["ok"] == 40  # every key was accepted by the gateway
    assert [v["requests"] for v in even.summary["per_key"].values()] == [20, 20]

    weighted = Workload("chat-small", keys=(Key(a, 3), Key(c, 1)), seed=5)
    s = run(url, weighted, concurrency=8, requests=200).summary
    assert s["ok"] == 200
    share = s["per_key"][Key(a).label]["requests"] / 200
    assert 0.65 < share < 0.85  # 0.75 expected; binomial s.e. 0.03
    assert a not in str(s) and c not in str(s)  # labels only, never the secrets
