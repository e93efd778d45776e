"""A deterministic toy tokenizer and text source, so token counts are exact and reproducible.

Counting rule (the contract tests and the gateway's estimates rely on):
  * a token is a run of 1 to 6 word characters (`\\w`), or one character that is neither a word
    character nor whitespace; whitespace costs nothing. "Hello, world!" is 4 tokens,
    "internationalization" is 4.
  * a chat prompt costs, per message, the tokens of its text content plus
    CHAT_TOKENS_PER_MESSAGE (role header and end-of-turn markers of a chat template), plus
    CHAT_TOKENS_REPLY_PRIMER once (the assistant header that opens the reply).
  * a completion prompt costs the tokens of its text; a list of token ids costs its length.
Generated text is made of vocabulary pieces that are each exactly one token under this rule, so
re-counting the output gives completion_tokens (unless a stop string cut the last piece).
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_REPLY_PRIMER = 3

_TOKEN_RE = re.compile(r"\w{1,6}|[^\w\s]")

_WORD_LIST = (
    "the of and to in is it for on that with as was at by be this from or an are "
    "not but all can had her his one our out day get has him how man new now old see "
    "two way who boy did its let put say she too use sky sea sun run fast slow very "
    "time work play code data node path test fine good true word line rate load"
)
_WORDS = _WORD_LIST.split()
# Pieces after the first carry a leading space; punctuation attaches to the previous word.
_PIECES: tuple[str, ...] = (*(" " + w for w in _WORDS), ".", ",")
_STREAM_LEN = 8192


def count_tokens(text: str) -> int:
    """Tokens of `text` under the module's counting rule."""
    return len(_TOKEN_RE.findall(text))


def message_text(content: Any) -> str:
    """Text of a chat message's content: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    raise TypeError("message content must be a string or a list of content parts")


def chat_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Prompt tokens of a chat request (see the module docstring for the rule)."""
    total = CHAT_TOKENS_REPLY_PRIMER
    for message in messages:
        total += CHAT_TOKENS_PER_MESSAGE + count_tokens(message_text(message.get("content")))
    return total


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (unlike hash(), which is salted)."""
    return zlib.crc32(text.encode())


class TextSource:
    """A fixed pseudo-random stream of one-token pieces; each choice reads it from an offset.

    Precomputing the stream once keeps per-token cost to a list index.
    """

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        pieces = [
            rng.choice(_PIECES[:-2]) if rng.random() < 0.9 else rng.choice(_PIECES[-2:])
            for _ in range(_STREAM_LEN)
        ]
        self._pieces = pieces

    def pieces(self, offset: int, count: int) -> list[str]:
        """`count` pieces starting at `offset`; the first loses its leading space."""
        n = len(self._pieces)
        out = [self._pieces[(offset + i) % n] for i in range(count)]
        if out:
            first = out[0].lstrip()
            out[0] = first if first not in ".," else "Yes"
        return out
