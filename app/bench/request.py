"""Send one OpenAI-compatible request and fill in its record: status, error kind, time of each
content chunk, usage. A lean HTTP client (app/bench/http.py) and a cheap parse, because on a
small machine the load generator's own CPU would otherwise be part of what is measured."""

from __future__ import annotations

import asyncio
import time

import orjson

from app.bench.http import Poster, error_kind, sse_lines
from app.bench.stats import RequestRecord
from app.proxy.upstream import UpstreamError


def _has_content(event: dict[str, object]) -> bool:
    choices = event.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if isinstance(choice, dict):
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                return True
    return False


def _usage(record: RequestRecord, event: dict[str, object]) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict):
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        record.completion_tokens = int(usage.get("completion_tokens") or 0)


async def send(
    poster: Poster,
    body: bytes,
    head: bytes,
    record: RequestRecord,
    stream: bool,
) -> None:
    """POST ``body`` (with the header lines ``head``); never raises (failures become
    ``record.error``)."""
    record.sent = time.perf_counter()
    try:
        async with asyncio.timeout(poster.timeout_s):
            async with await poster.post(body, head) as resp:
                record.status = resp.status
                if resp.status != 200:
                    await resp.read()
                    record.error = f"http_{resp.status}"
                    return
                if not stream:
                    _usage(record, orjson.loads(await resp.read()))
                    return
                done = False
                async for now, line in sse_lines(resp):
                    if done or not line.startswith(b"data: "):
                        continue  # after [DONE]: read to the end, so the connection is kept
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    event = orjson.loads(data)
                    if "error" in event:
                        record.error = "stream_error"
                        return
                    if _has_content(event):
                        if record.first_token is None:
                            record.first_token = now
                        record.chunk_times.append(now)
                    _usage(record, event)
                if not done:
                    record.error = "broken_stream"
    except (TimeoutError, UpstreamError) as exc:
        record.error = error_kind(exc)
    except orjson.JSONDecodeError:
        record.error = "bad_response"
    finally:
        record.end = time.perf_counter()
