"""What the load generator sends: prompt and completion lengths drawn from distributions, and
which key each request carries.

Everything is drawn from one seeded generator, so two runs with the same seed send the same
requests (same lengths, same keys, same text) and differ only in timing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import orjson

# Short words that are one token for the simulator's tokenizer and usually one token for real
# BPE tokenizers, so "N prompt tokens" is exact against the simulator and close elsewhere.
_WORD_TEXT = (
    "the of and to in is it for on that with as was at by be this from or an are not but all "
    "can had her his one our out day get has him how man new now old see two way who boy did "
    "its let put say she too use sky sea sun run fast slow very time work play code data node "
    "path test fine good true word line rate load rail car yard train track"
)
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class Dist:
    """A distribution of positive integers (token counts), parsed from the command line.

    ``128`` (fixed), ``uniform:LO:HI`` (inclusive), ``normal:MEAN:STD``,
    ``lognormal:MEAN:STD`` (mean and standard deviation of the lengths themselves, which is how
    people describe them; a long right tail like real completions). Draws are rounded and
    clamped to [1, cap]."""

    kind: str
    a: float
    b: float = 0.0
    cap: int = 1_000_000

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            value = rng.gauss(self.a, self.b)
        else:  # lognormal with the given mean and std of the lengths
            sigma2 = math.log(1 + (self.b / self.a) ** 2)
            value = rng.lognormvariate(math.log(self.a) - sigma2 / 2, math.sqrt(sigma2))
        return max(1, min(self.cap, round(value)))

    @property
    def mean(self) -> float:
        """Expected value before clamping (tests and reports compare against it)."""
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        return f"{self.kind}:{self.a:g}:{self.b:g}"


def parse_dist(text: str) -> Dist:
    """``Dist`` from ``128``, ``uniform:64:256``, ``normal:128:32`` or ``lognormal:128:64``."""
    parts = text.strip().split(":")
    try:
        if len(parts) == 1:
            value = int(parts[0])
            if value < 1:
                raise ValueError
            return Dist("fixed", value)
        kind, a, b = parts[0].lower(), float(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        raise ValueError(
            f"{text!r} is not a length: use N, uniform:LO:HI, normal:MEAN:STD or lognormal:MEAN:STD"
        ) from None
    if len(parts) != 3 or kind not in ("uniform", "normal", "lognormal"):
        raise ValueError(f"{text!r}: the kind must be uniform, normal or lognormal with 2 numbers")
    if kind == "uniform" and not 1 <= a <= b:
        raise ValueError(f"{text!r}: uniform needs 1 <= LO <= HI")
    if kind != "uniform" and (a <= 0 or b < 0):
        raise ValueError(f"{text!r}: the mean must be > 0 and the std >= 0")
    return Dist(kind, a, b)


@dataclass(frozen=True)
class Key:
    """An API key and its share of the traffic. ``label`` is safe to print and store."""

    secret: str
    weight: float = 1.0

    @property
    def label(self) -> str:
        # Switchyard keys read sy-<public id>-<secret>: the id identifies the key, the rest
        # must never reach a result file.
        parts = self.secret.split("-")
        if len(parts) >= 3 and parts[0] == "sy":
            return f"sy-{parts[1]}"
        return self.secret[:6] + "…" if len(self.secret) > 8 else self.secret


def parse_key(text: str) -> Key:
    """``KEY`` or ``KEY:WEIGHT`` (weights are relative; keys themselves never contain ``:``)."""
    secret, sep, tail = text.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return Key(text)
        if weight <= 0:
            raise ValueError(f"the weight of a key must be > 0, not {tail}")
        return Key(secret, weight)
    return Key(text)


@dataclass(frozen=True)
class Planned:
    """One request ready to send: its body and what was asked for, to check what came back."""

    index: int
    key: int  # index into Workload.keys
    body: bytes
    prompt_tokens: int  # words in the prompt (the simulator adds its chat-template tokens)
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """The requests of a run. ``keys`` are used round-robin when all weights are equal,
    otherwise drawn at random with those weights."""

    model: str
    keys: Sequence[Key] = (Key("none"),)
    prompt_tokens: Dist = Dist("fixed", 32)
    max_tokens: Dist = Dist("fixed", 16)
    stream: bool = False
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (fixed decode work)
    seed: int = 0

    def plan(self) -> Iterator[Planned]:
        """An endless, seeded sequence of requests."""
        rng = random.Random(self.seed)
        weights = [k.weight for k in self.keys]
        uniform = len(set(weights)) == 1
        payload: dict[str, object] = {"model": self.model, "stream": self.stream}
        if self.stream:
            payload["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            payload["ignore_eos"] = True
        index = 0
        while True:
            n_prompt = self.prompt_tokens.sample(rng)
            n_out = self.max_tokens.sample(rng)
            if uniform:
                key = index % len(self.keys)
            else:
                key = rng.choices(range(len(self.keys)), weights)[0]
            # A different random text each time, so no prefix cache makes later requests cheap.
            text = " ".join(rng.choices(_WORDS, k=n_prompt))
            payload["messages"] = [{"role": "user", "content": text}]
            payload["max_tokens"] = n_out
            yield Planned(index, key, orjson.dumps(payload), n_prompt, n_out)
            index += 1
