"""A local HTTP server that behaves like Stripe's meter-events endpoint, for tests.

It parses the form-encoded body exactly as the `stripe` package sends it, validates the
parameters as Stripe does (400 with Stripe's error shape), rejects a duplicate `identifier`
within its memory (Stripe enforces uniqueness for at least 24 h), knows which customers and
meters exist, and can be told to fail: 500s, 429s with or without Retry-After, slow answers,
dropped connections.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from tests.support.procs import free_port


@dataclass
class Fault:
    kind: str  # "500" | "429" | "429-retry-after" | "slow" | "drop"
    seconds: float = 0.0


@dataclass
class StripeState:
    customers: set[str] | None = None  # None: every customer exists
    meters: set[str] | None = None
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # identifier -> event
    calls: int = 0
    duplicates: int = 0
    faults: deque[Fault] = field(default_factory=deque)
    fail_every: int = 0  # every k-th call fails with 500 (0 = never)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def totals(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for ev in self.accepted.values():
            k = (ev["customer"], ev["event_name"])
            out[k] = out.get(k, 0) + ev["value"]
        return out


def _error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> tuple[int, dict[str, Any]]:
    err: dict[str, Any] = {"type": "invalid_request_error", "message": message}
    if code:
        err["code"] = code
    if param:
        err["param"] = param
    return status, {"error": err}


class FakeStripe:
    def __init__(self) -> None:
        self.state = StripeState()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length).decode()
                with state.lock:
                    state.calls += 1
                    fault = state.faults.popleft() if state.faults else None
                    if fault is None and state.fail_every and state.calls % state.fail_every == 0:
                        fault = Fault("500")
                if fault is not None:
                    if fault.kind == "drop":
                        self.connection.close()
                        self.close_connection = True
                        return
                    if fault.kind == "slow":
                        time.sleep(fault.seconds)
                    elif fault.kind == "500":
                        self._send(*_error(500, "An unknown error occurred", "api_error"))
                        return
                    elif fault.kind.startswith("429"):
                        headers = {"Retry-After": "1"} if fault.kind == "429-retry-after" else {}
                        self._send(*_error(429, "Too many requests", "rate_limit"), headers)
                        return
                if self.path != "/v1/billing/meter_events":
                    self._send(*_error(404, f"Unrecognized request URL (POST: {self.path})"))
                    return
                if not self.headers.get("authorization", "").startswith("Bearer sk_"):
                    self._send(
                        401,
                        {
                            "error": {
                                "type": "invalid_request_error",
                                "message": "Invalid API Key provided",
                            }
                        },
                    )
                    return
                self._send(*self._meter_event(parse_qs(body, keep_blank_values=True)))

            def _meter_event(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
                def one(name: str) -> str | None:
                    values = form.get(name)
                    return values[0] if values else None

                name = one("event_name")
                customer = one("payload[stripe_customer_id]")
                value = one("payload[value]")
                ident = one("identifier")
                ts = one("timestamp")
                if not name:
                    return _error(
                        400,
                        "Missing required param: event_name.",
                        "parameter_missing",
                        "event_name",
                    )
                if not customer or value is None:
                    return _error(400, "Missing payload fields.", "parameter_missing", "payload")
                if not value.lstrip("-").isdigit():
                    return _error(
                        400,
                        "Value must be an integer.",
                        "parameter_invalid_integer",
                        "payload[value]",
                    )
                if ident is not None and len(ident) > 100:
                    return _error(
                        400, "Identifier too long.", "parameter_invalid_string_length", "identifier"
                    )
                now = time.time()
                if ts is not None and not (now - 35 * 86400 <= int(ts) <= now + 300):
                    return _error(
                        400, "Timestamp out of range.", "parameter_invalid_integer", "timestamp"
                    )
                if state.meters is not None and name not in state.meters:
                    return _error(
                        400,
                        f"No active meter was found for event_name {name}.",
                        "resource_missing",
                        "event_name",
                    )
                if state.customers is not None and customer not in state.customers:
                    return _error(
                        400,
                        f"No such customer: '{customer}'",
                        "resource_missing",
                        "payload[stripe_customer_id]",
                    )
                with state.lock:
                    if ident is not None and ident in state.accepted:
                        state.duplicates += 1
                        return _error(
                            400,
                            f"An event already exists with identifier {ident}.",
                            "resource_already_exists",
                            "identifier",
                        )
                    event = {
                        "event_name": name,
                        "customer": customer,
                        "value": int(value),
                        "identifier": ident,
                        "timestamp": int(ts or now),
                    }
                    state.accepted[ident or f"gen-{len(state.accepted)}"] = event
                return 200, {
                    "object": "billing.meter_event",
                    "event_name": name,
                    "identifier": ident,
                    "livemode": False,
                    "created": int(now),
                    "payload": {"stripe_customer_id": customer, "value": value},
                    "timestamp": int(ts or now),
                }

            def _send(
                self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_fake_{state.calls}")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeStripe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
