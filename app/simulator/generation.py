"""Decide, before any time passes, exactly what each choice of a request will output.

Planning up front keeps the timed part (engine pacing) trivial and makes every length and
finish_reason reproducible from the seed. Rules:
  * natural length: `output_tokens`, or uniform in [output_tokens, output_tokens_max] drawn
    from the request's `seed` (else the config seed and an arrival counter); raised to
    `min_tokens`; infinite with `ignore_eos`.
  * cap: `max_tokens`, or (like vLLM) `max_model_len - prompt_tokens` when it is absent.
  * length = min(natural, cap); finish_reason "stop" if natural < cap else "length".
  * a `stop` string ends the choice at the token that completes it ("stop"); the text is cut
    before the stop string but the token still counts, as in vLLM.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from app.simulator.config import SimulatorConfig
from app.simulator.protocol import GenerateRequest
from app.simulator.tokens import TextSource, stable_hash


@dataclass(frozen=True, slots=True)
class ChoicePlan:
    """One output sequence: the text of each token in order, and why it ends."""

    index: int
    pieces: list[str]
    finish_reason: str

    @property
    def tokens(self) -> int:
        return len(self.pieces)


def plan_choices(
    req: GenerateRequest, config: SimulatorConfig, source: TextSource, counter: int
) -> list[ChoicePlan]:
    seed = req.seed if req.seed is not None else (config.seed << 32) + counter
    rng = random.Random(seed)
    lo = config.output_tokens
    hi = config.output_tokens_max if config.output_tokens_max is not None else lo
    greedy = req.temperature == 0.0
    plans: list[ChoicePlan] = []
    for p_index, prompt in enumerate(req.prompts):
        cap = req.max_tokens if req.max_tokens is not None else config.max_model_len - prompt.tokens
        for i in range(req.n):
            drawn = rng.randint(lo, hi)
            natural = math.inf if req.ignore_eos else max(drawn, req.min_tokens)
            offset = stable_hash(prompt.key) if greedy else rng.randrange(1 << 30)
            length = int(min(natural, cap))
            reason = "stop" if natural < cap else "length"
            pieces = source.pieces(offset, length)
            if req.stop:
                pieces, reason = _apply_stop(pieces, req.stop, reason)
            plans.append(ChoicePlan(index=p_index * req.n + i, pieces=pieces, finish_reason=reason))
    return plans


def _apply_stop(pieces: list[str], stops: tuple[str, ...], reason: str) -> tuple[list[str], str]:
    """Cut at the first token whose text completes a stop string."""
    longest = max(len(s) for s in stops)
    text = ""
    for i, piece in enumerate(pieces):
        before = len(text)
        text += piece
        window_start = max(0, before - longest + 1)
        hits = [pos for s in stops if (pos := text.find(s, window_start)) != -1]
        if hits:
            cut = min(hits)
            kept = pieces[:i]
            kept.append(text[before:cut] if cut > before else "")
            return kept, "stop"
    return pieces, reason
