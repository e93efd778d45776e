"""Pure parts of the simulator, in-process: token rule, output planning, config and CLI."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorConfig, create_app
from app.simulator.cli import build_parser, config_from_args
from app.simulator.generation import plan_choices
from app.simulator.protocol import GenerateRequest, Prompt
from app.simulator.tokens import TextSource, chat_prompt_tokens, count_tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("Hello, world!", 4), ("internationalization", 4), ("a  b\n c", 3), ("!!", 2)],
)
def test_token_rule(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


def test_chat_prompt_rule_adds_per_message_and_primer_overhead() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},  # 3 tokens
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},  # 2 tokens
    ]
    assert chat_prompt_tokens(messages) == 3 + 2 + 2 * 4 + 3


def test_generated_text_recounts_to_its_token_count() -> None:
    pieces = TextSource(seed=3).pieces(offset=11, count=500)
    assert count_tokens("".join(pieces)) == 500


def _req(**overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "endpoint": "completion",
        "prompts": (Prompt(tokens=5, key="p"),),
        "max_tokens": None,
        "n": 1,
        "stream": False,
        "include_usage": False,
        "stop": (),
        "ignore_eos": False,
        "min_tokens": 0,
        "seed": None,
        "temperature": None,
    }
    return GenerateRequest(**{**fields, **overrides})


def _plan(req: GenerateRequest, **config: Any) -> list[tuple[int, str]]:
    plans = plan_choices(req, SimulatorConfig(**config), TextSource(0), counter=1)
    return [(p.tokens, p.finish_reason) for p in plans]


def test_natural_end_before_max_tokens_is_stop_else_length() -> None:
    assert _plan(_req(max_tokens=100), output_tokens=16) == [(16, "stop")]
    assert _plan(_req(max_tokens=10), output_tokens=16) == [(10, "length")]
    assert _plan(_req(max_tokens=10, ignore_eos=True), output_tokens=4) == [(10, "length")]
    assert _plan(_req(max_tokens=10, min_tokens=8), output_tokens=4) == [(8, "stop")]


def test_without_max_tokens_the_cap_is_the_rest_of_the_context() -> None:
    assert _plan(_req(ignore_eos=True), max_model_len=20) == [(15, "length")]


def test_random_lengths_stay_in_range_and_repeat_for_a_seed() -> None:
    req = _req(seed=123, n=8)
    first = _plan(req, output_tokens=5, output_tokens_max=50)
    assert first == _plan(req, output_tokens=5, output_tokens_max=50)
    assert all(5 <= n <= 50 for n, _ in first)
    assert len({n for n, _ in first}) > 1


def test_stop_string_ends_the_choice_and_is_not_in_the_text() -> None:
    source = TextSource(0)
    req = _req(max_tokens=30, temperature=0.0, ignore_eos=True)
    full = plan_choices(req, SimulatorConfig(), source, counter=1)[0].pieces
    stop = full[5].strip()
    cut = plan_choices(
        _req(max_tokens=30, temperature=0.0, stop=(stop,)), SimulatorConfig(), source, 1
    )
    (choice,) = cut
    assert choice.finish_reason == "stop"
    assert choice.tokens <= 6
    assert stop not in "".join(choice.pieces)


def test_config_update_validates_and_keeps_identity() -> None:
    config = SimulatorConfig(model="m")
    assert config.updated({"ttft_ms": 5, "max_waiting": None}).ttft_ms == 5.0
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        config.updated({"max_num_seqs": 0})
    with pytest.raises(ValueError, match="unknown field 'nope'"):
        config.updated({"nope": 1})
    with pytest.raises(ValueError, match="hang must be bool"):
        config.updated({"hang": "yes"})


def test_every_config_field_is_a_cli_flag() -> None:
    args = build_parser().parse_args(
        ["--model", "m", "--port", "9", "--kind", "embedding", "--ttft-ms", "1.5",
         "--max-waiting", "3", "--no-healthy", "--hang", "--fail-after-tokens", "2"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.model, config.kind, config.ttft_ms, config.max_waiting) == (
        "m",
        "embedding",
        1.5,
        3,
    )
    assert (config.healthy, config.hang, config.fail_after_tokens) == (False, True, 2)
    assert args.port == 9


def test_create_app_serves_in_process() -> None:
    app = create_app(SimulatorConfig(model="m", ttft_ms=0, tokens_per_s=0))

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            return await client.post(
                "/v1/completions", json={"model": "m", "prompt": "one two", "max_tokens": 3}
            )

    r = asyncio.run(call())
    assert r.status_code == 200
    assert r.json()["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": None,
    }
