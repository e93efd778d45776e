"""Server-sent events from the engine, split into whole events as bytes arrive.

The gateway relays each event as soon as it is complete; it parses JSON only for the rare
event that carries ``usage``, so the hot loop is a few ``bytes`` searches per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

DONE = b"data: [DONE]"


@dataclass(frozen=True, slots=True)
class EventInfo:
    """What the relay needs to know about one event."""

    usage: dict[str, int] | None = None
    usage_only: bool = False  # the include_usage chunk: choices == [] and usage set
    content: bool = False  # carries a generated token (a choice that is not just the role)
    error: bool = False
    done: bool = False  # data: [DONE], the end of the stream


# Shared answers for the events of every stream (no allocation per event).
_OTHER = EventInfo()
_CONTENT = EventInfo(content=True)
_DONE = EventInfo(done=True)


class SSESplitter:
    """Accumulates bytes and returns complete events (each ending with a blank line).

    Line endings ``\r\n`` become ``\n`` as in one pass over the whole stream, wherever the
    stream is cut into reads (a read's last ``\r`` waits for the next one). Each byte is
    copied and searched a bounded number of times, so an engine that sends one huge event in
    small reads costs linear, not quadratic, time on the event loop."""

    def __init__(self, max_buffer: int = 8 * 1024 * 1024) -> None:
        self._buf = bytearray()  # normalized bytes of the incomplete event
        self._cr = False  # the last read ended with b"\r", held back
        self._max = max_buffer

    def feed(self, data: bytes) -> list[bytes]:
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        buf = self._buf
        events: list[bytes] = []
        start = 0
        if not buf:  # the usual case, reads of whole events: split the read itself
            while (end := data.find(b"\n\n", start)) >= 0:
                events.append(data[start : end + 2])
                start = end + 2
            buf += data[start:]
        else:
            search = len(buf) - 1  # the buffer holds no blank line yet
            buf += data
            while (end := buf.find(b"\n\n", search)) >= 0:
                events.append(bytes(buf[start : end + 2]))
                start = search = end + 2
            del buf[:start]
        if len(buf) + self._cr > self._max:
            raise ValueError("upstream sent an event larger than the buffer limit")
        return events

    @property
    def pending(self) -> bytes:
        return bytes(self._buf) + (b"\r" if self._cr else b"")


def inspect(event: bytes) -> EventInfo:
    """Classify one SSE event without a JSON parse unless it carries usage or an error."""
    if not event.startswith(b"data:"):
        return _OTHER
    if event.startswith(DONE):
        return _DONE
    has_usage = (
        b'"usage"' in event and b'"usage":null' not in event and b'"usage": null' not in event
    )
    error = b'"error"' in event[:32]
    if not has_usage:
        content = (
            b'"choices":[]' not in event
            and b'"choices": []' not in event
            and not _opens_chat(event)
        )
        if error:
            return EventInfo(content=content, error=True)
        return _CONTENT if content else _OTHER
    try:
        obj = orjson.loads(event[5:].strip())
    except orjson.JSONDecodeError:
        return EventInfo(error=error)
    if not isinstance(obj, dict):
        return EventInfo(error=error)
    usage = obj.get("usage")
    choices = obj.get("choices")
    return EventInfo(
        usage={k: int(v) for k, v in usage.items() if isinstance(v, int)}
        if isinstance(usage, dict)
        else None,
        usage_only=choices == [],
        content=bool(choices) and not _opens_chat(event),
        error=error,
    )


def _opens_chat(event: bytes) -> bool:
    """The assistant-role event that opens a chat stream (empty content): no token yet."""
    return b'"role"' in event and (b'"content":""' in event or b'"content": ""' in event)
