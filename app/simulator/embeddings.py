"""Deterministic unit-norm embedding vectors: the same input always maps to the same vector."""

from __future__ import annotations

import base64
import hashlib
import math
from array import array


def embed(key: str, dim: int, seed: int = 0) -> list[float]:
    """A unit vector seeded by a hash of (seed, key); cheap (one SHAKE digest)."""
    raw = hashlib.shake_128(f"{seed}\x00{key}".encode()).digest(2 * dim)
    ints = array("h", raw)
    norm = math.sqrt(sum(v * v for v in ints)) or 1.0
    return [v / norm for v in ints]


def to_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes."""
    floats = array("f", vector)
    if floats.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte floats
        raise RuntimeError("float32 array expected")
    if array("H", [1]).tobytes() != b"\x01\x00":  # pragma: no cover - big-endian host
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode()
