"""``GET /admin/pool`` as a table for people (``switchyard pool``)."""

from __future__ import annotations

from typing import Any


def _health(r: dict[str, Any]) -> str:
    if not r["healthy"]:
        return "down"
    if not r["available"]:
        return f"ejected {r['ejected_for_s']:g}s"
    return "probation" if r.get("probation") else "ok"


def _rows(model: str, routing: str, replicas: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            model if i == 0 else "",
            routing if i == 0 else "",
            r["url"],
            _health(r),
            str(r["outstanding"]),
            str(r.get("waiting", 0)),
            f"{r.get('kv_cache_usage', 0.0):.2f}",
        ]
        for i, r in enumerate(replicas)
    ]


def _split(kind: str, s: dict[str, Any]) -> str:
    parts = []
    for t in s["targets"]:
        weight = f"{t['weight']:g}"
        if t["rolled_back"]:
            weight += " -> 0 (rolled back by the guard)"
        parts.append(f"{t['target']} {weight}")
    flags = [f for f, on in (("sticky", s["sticky"]), ("guarded", s["guard"])) if on]
    suffix = f" [{', '.join(flags)}]" if flags else ""
    return f"{kind} {s['name']}{suffix}: " + " | ".join(parts)


def format_pool(view: dict[str, Any]) -> str:
    header = ["MODEL", "ROUTING", "REPLICA", "HEALTH", "OUT", "WAIT", "KV"]
    rows: list[list[str]] = []
    splits: list[str] = []
    for m in view.get("models", []):
        rows += _rows(m["model"], m["routing"], m["replicas"])
        if "canary" in m:
            rows += _rows(m["canary"]["target"], "(canary)", m["canary"]["replicas"])
            splits.append(_split("canary", m["split"]))
        if m.get("fallbacks"):
            splits.append(f"fallbacks {m['model']}: " + ", ".join(m["fallbacks"]))
    splits += [_split("alias", a) for a in view.get("aliases", [])]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]  # fmt: skip
    return "\n".join(lines + (["", *splits] if splits else []))
