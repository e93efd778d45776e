"""Logging set-up with secret redaction: API keys, bearer tokens and Stripe keys never reach
a log line, whoever formats it."""

from __future__ import annotations

import logging
import re

_SECRETS = re.compile(
    r"(sy-[a-z2-9]{12}-)[A-Za-z0-9_-]{8,}"  # our API keys: keep the public id, drop the secret
    r"|(?i:(bearer\s+))[^\s\"',]+"  # any bearer token
    r"|\b((?:sk|rk)_(?:live|test)_)[A-Za-z0-9]+"  # Stripe secret / restricted keys
)


def redact(text: str) -> str:
    def _sub(m: re.Match[str]) -> str:
        prefix = next(g for g in m.groups() if g is not None)
        return f"{prefix}[redacted]"

    return _SECRETS.sub(_sub, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
