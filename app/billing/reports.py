"""Reading what billing knows: usage per key or customer, dead letters, reconciliation.

The usage API, the admin API and the CLI all read these same aggregates (written by fold.lua).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from app.billing.worker import DEAD_LIST, RECORDED, SENT_TOTAL, WINDOWS, window_key

DAY_S = 86400


def _day_keys(scope: str, ident: str, days: int) -> list[tuple[int, str]]:
    today = int(time.time()) // DAY_S
    return [(d, f"sy:{{bill}}:day:{d}:{scope}:{ident}") for d in range(today - days + 1, today + 1)]


def _shape(day: int, raw: dict[bytes, bytes]) -> dict[str, Any]:
    models: dict[str, dict[str, int]] = defaultdict(dict)
    for k, v in raw.items():
        model, kind = k.decode().split("\t", 1)
        models[model][kind + ("_tokens" if kind != "requests" else "")] = int(v)
    return {"date": time.strftime("%Y-%m-%d", time.gmtime(day * DAY_S)), "models": dict(models)}


async def usage(redis_client: AsyncRedis, scope: str, ident: str, days: int) -> dict[str, Any]:
    """Daily usage of a key (scope "key") or customer (scope "cus") for the last ``days``."""
    keys = _day_keys(scope, ident, days)
    async with redis_client.pipeline(transaction=False) as pipe:
        for _, k in keys:
            pipe.hgetall(k)
        raws = await pipe.execute()
    data = [_shape(d, raw) for (d, _), raw in zip(keys, raws, strict=True) if raw]
    totals: dict[str, int] = defaultdict(int)
    for day in data:
        for counts in day["models"].values():
            for kind, n in counts.items():
                totals[kind] += n
    return {"object": "usage", "days": days, "data": data, "totals": dict(totals)}


def dead_letters(client: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in client.lrange(DEAD_LIST, 0, -1)]


def reconcile(client: Any) -> list[dict[str, Any]]:
    """Per (customer, meter): recorded = sent + waiting + dead, or a difference to look at."""
    recorded = {k.decode(): int(v) for k, v in client.hgetall(RECORDED).items()}
    sent = {k.decode(): int(v) for k, v in client.hgetall(SENT_TOTAL).items()}
    waiting: dict[str, int] = defaultdict(int)
    dead: dict[str, int] = defaultdict(int)
    for start in client.zrange(WINDOWS, 0, -1):
        s = int(start)
        done = {k.decode() for k in client.hkeys(window_key(s, "sent"))}
        for k, v in client.hgetall(window_key(s, "dead")).items():
            dead[k.decode()] += int(v)
            done.add(k.decode())
        for k, v in client.hgetall(window_key(s, "totals")).items():
            if k.decode() not in done:
                waiting[k.decode()] += int(v)
    for entry in dead_letters(client):
        fld = f"{entry['customer']}\t{entry['meter']}"
        if entry["window"] not in {int(s) for s in client.zrange(WINDOWS, 0, -1)}:
            dead[fld] += int(entry["value"])
    rows = []
    for fld in sorted(set(recorded) | set(sent)):
        customer, meter = fld.split("\t", 1)
        r, s, w, d = recorded.get(fld, 0), sent.get(fld, 0), waiting[fld], dead[fld]
        rows.append(
            {
                "customer": customer,
                "meter": meter,
                "recorded": r,
                "sent": s,
                "waiting": w,
                "dead_letter": d,
                "difference": r - s - w - d,
            }
        )
    return rows
