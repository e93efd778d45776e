"""The regression gate's verdicts: a ratio fails only when worse than its tolerance allows,
in the direction that is worse, and a ratio not measured (no LiteLLM) is skipped."""

from __future__ import annotations

from typing import Any

from bench.regress import judge

BASELINE: dict[str, Any] = {
    "ratios": {
        "latency": {"value": 1.10, "better": "lower", "tolerance": 0.10},
        "throughput": {"value": 0.50, "better": "higher", "tolerance": 0.20},
        "litellm": {"value": 10.0, "better": "higher", "tolerance": 0.40},
    }
}


def status(ratios: dict[str, float]) -> dict[str, str]:
    return {v["ratio"]: v["status"] for v in judge(ratios, BASELINE)}


def test_within_tolerance_or_better_passes() -> None:
    assert status({"latency": 1.20, "throughput": 0.41, "litellm": 25.0}) == {
        "latency": "ok",
        "throughput": "ok",
        "litellm": "ok",
    }
    assert status({"latency": 0.9, "throughput": 0.9, "litellm": 6.1})["latency"] == "ok"


def test_worse_than_the_tolerance_fails_in_the_worse_direction() -> None:
    verdict = status({"latency": 1.22, "throughput": 0.39, "litellm": 5.9})
    assert verdict == {"latency": "regressed", "throughput": "regressed", "litellm": "regressed"}


def test_a_ratio_not_measured_is_skipped_not_failed() -> None:
    assert status({"latency": 1.1, "throughput": 0.5})["litellm"] == "skipped"
