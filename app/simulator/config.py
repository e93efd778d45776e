"""The simulator's behaviour knobs: one frozen dataclass, settable from flags and at runtime.

Every field is a CLI flag (`--ttft-ms`, ...) and a key of `POST /sim/config`. Updates build a
new validated instance and swap it in, so a request always sees one consistent snapshot.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["chat", "completion", "embedding"]
KINDS: tuple[str, ...] = typing.get_args(Kind)

# Identity of the replica: fixed for the life of the process.
READ_ONLY_FIELDS = frozenset({"model", "kind"})


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulated engine behaves; each field doubles as a CLI flag and a runtime key."""

    model: str = field(default="chat-small", metadata=_help("served model name"))
    kind: Kind = field(default="chat", metadata=_help("chat | completion | embedding"))
    ttft_ms: float = field(
        default=20.0, metadata=_help("base delay from getting a slot to the first token")
    )
    prefill_ms_per_token: float = field(
        default=0.0, metadata=_help("extra time to first token per prompt token")
    )
    tokens_per_s: float = field(
        default=100.0, metadata=_help("decode rate per sequence; 0 = as fast as possible")
    )
    max_num_seqs: int = field(
        default=256, metadata=_help("concurrently running requests; the rest wait (FIFO)")
    )
    max_waiting: int | None = field(
        default=None, metadata=_help("bound of the waiting queue; beyond it answer 503")
    )
    max_model_len: int = field(default=4096, metadata=_help("context length (prompt + output)"))
    kv_cache_tokens: int = field(
        default=65536, metadata=_help("KV cache capacity in tokens, for kv_cache_usage_perc")
    )
    output_tokens: int = field(
        default=16, metadata=_help("natural output length (tokens) before a simulated EOS")
    )
    output_tokens_max: int | None = field(
        default=None,
        metadata=_help("if set, natural length is uniform in [output_tokens, this], per seed"),
    )
    fail_rate: float = field(
        default=0.0, metadata=_help("fraction of requests answered with fail_status")
    )
    fail_status: int = field(default=500, metadata=_help("HTTP status of simulated failures"))
    fail_after_tokens: int | None = field(
        default=None, metadata=_help("drop the connection after this many generated tokens")
    )
    hang: bool = field(default=False, metadata=_help("accept requests but never answer"))
    healthy: bool = field(default=True, metadata=_help("false: /health answers 503"))
    seed: int = field(default=0, metadata=_help("seed of failures, lengths and text"))
    embedding_dim: int = field(default=384, metadata=_help("embedding vector size"))

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("invalid simulator config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """A copy with `changes` applied; ValueError names every bad key or value."""
        hints = _field_types()
        problems: list[str] = []
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in hints:
                problems.append(f"unknown field {key!r} (allowed: {', '.join(sorted(hints))})")
            elif key in READ_ONLY_FIELDS and value != getattr(self, key):
                problems.append(f"{key!r} cannot change at runtime")
            else:
                try:
                    clean[key] = coerce(key, hints[key], value)
                except ValueError as exc:
                    problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return dataclasses.replace(self, **clean)


def _problems(c: SimulatorConfig) -> list[str]:
    checks: list[tuple[bool, str]] = [
        (bool(c.model), "model must not be empty"),
        (c.kind in KINDS, f"kind must be one of {', '.join(KINDS)}"),
        (c.ttft_ms >= 0 and math.isfinite(c.ttft_ms), "ttft_ms must be >= 0"),
        (c.prefill_ms_per_token >= 0, "prefill_ms_per_token must be >= 0"),
        (c.tokens_per_s >= 0, "tokens_per_s must be >= 0"),
        (c.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
        (c.max_waiting is None or c.max_waiting >= 0, "max_waiting must be >= 0"),
        (c.max_model_len >= 2, "max_model_len must be >= 2"),
        (c.kv_cache_tokens >= 1, "kv_cache_tokens must be >= 1"),
        (c.output_tokens >= 1, "output_tokens must be >= 1"),
        (
            c.output_tokens_max is None or c.output_tokens_max >= c.output_tokens,
            "output_tokens_max must be >= output_tokens",
        ),
        (0.0 <= c.fail_rate <= 1.0, "fail_rate must be within [0, 1]"),
        (400 <= c.fail_status <= 599, "fail_status must be an HTTP error status"),
        (
            c.fail_after_tokens is None or c.fail_after_tokens >= 0,
            "fail_after_tokens must be >= 0",
        ),
        (c.embedding_dim >= 1, "embedding_dim must be >= 1"),
    ]
    return [message for ok, message in checks if not ok]


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(SimulatorConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SimulatorConfig)}


def coerce(name: str, hint: Any, value: Any) -> Any:
    """Check one JSON value against a field's annotation (int accepted where float is)."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{name} must not be null")
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(hint) is Literal:
        if value in args:
            return value
        raise ValueError(f"{name} must be one of {', '.join(map(str, args))}")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif base is str and isinstance(value, str):
        return value
    raise ValueError(f"{name} must be {getattr(base, '__name__', base)}, got {value!r}")
