"""Hostile clients against a real gateway process over real sockets.

The gateway runs as production runs it (``python -m app.cli gateway``: uvicorn, uvloop,
httptools), so its memory can be measured alone. Oversized, malformed, absurd, idle, slow and
never-reading clients each get a bounded, OpenAI-shaped JSON error or have their connection
closed by a timeout — never a 500 — while a normal client keeps being served and the
gateway's memory stays bounded.
"""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis as redis_sync
import yaml

from app.http_protocol import MAX_HEAD_BYTES
from tests.conftest import ADMIN_TOKEN, wait_for
from tests.hardening.conftest import base_url, engine
from tests.support.procs import Proc, free_port, start, switchyard

BODY_LIMIT = 65_536
TOTAL_TIMEOUT_S = 4.0
HEAD_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
IDLE_CONNECTIONS = 1500
MiB = 1024 * 1024
LONG_STREAM_TOKENS = 200_000  # ~30 MB of events, far more than the memory bound below
STREAM_TOKENS_PER_S = 20_000  # per stream: ~3 MB/s each that a non-reader leaves unread


@dataclass
class Gateway:
    proc: Proc
    url: str
    port: int
    key: str

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.proc.popen.pid)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def log(self) -> str:
        return self.proc.log()


@pytest.fixture(scope="module")
def open_files_limit() -> Iterator[int]:
    """Room for the idle connections in this process and in the gateway (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS * 2 + 512
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"open files hard limit {hard} < {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def long_engine(logs_dir: Path) -> Iterator[Proc]:
    """An engine that streams LONG_STREAM_TOKENS tokens as fast as it can."""
    proc = engine(
        logs_dir,
        "chat-small",
        "--output-tokens",
        str(LONG_STREAM_TOKENS),
        "--max-model-len",
        "1000000",
        "--tokens-per-s",  # fast, yet leaves the engine time to answer its health checks
        str(STREAM_TOKENS_PER_S),
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(
    open_files_limit: int,
    redis_server: str,
    long_engine: Proc,
    tmp_path_factory: pytest.TempPathFactory,
    logs_dir: Path,
) -> Iterator[Gateway]:
    redis_url = f"{redis_server.rsplit('/', 1)[0]}/8"
    client = redis_sync.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    home = tmp_path_factory.mktemp("hostile")
    catalog = home / "catalog.yaml"
    model = {"name": "chat-small", "endpoints": [base_url(long_engine)], "max_model_len": 10**6}
    catalog.write_text(yaml.safe_dump({"models": [model]}))
    port = free_port()
    env = {
        "SWITCHYARD_REDIS_URL": redis_url,
        "SWITCHYARD_CATALOG": str(catalog),
        "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN,
        "SWITCHYARD_SPOOL_DIR": str(home / "spool"),
        "SWITCHYARD_MAX_BODY_BYTES": str(BODY_LIMIT),
        "SWITCHYARD_TOTAL_TIMEOUT_S": str(TOTAL_TIMEOUT_S),
        "SWITCHYARD_REQUEST_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S),
        "SWITCHYARD_REQUEST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "SWITCHYARD_LOG_LEVEL": "info",
    }
    proc = start(
        switchyard("gateway", "--port", str(port)),
        logs_dir / f"hostile-gateway-{port}.log",
        ready_url=f"http://127.0.0.1:{port}/healthz",
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    created = httpx.post(
        f"{url}/admin/keys",
        json={"customer": "cus_hostile"},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    yield Gateway(proc, url, port, created.json()["key"])
    proc.stop()


# -- raw HTTP ---------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection

    def json(self) -> Any:
        return json.loads(self.body)


def connect(gw: Gateway, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    return sock


def read_answer(sock: socket.socket) -> Answer:
    """One response (Content-Length framed), or whatever came before the server closed."""
    data = b""
    closed = False
    while True:
        if b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            if "content-length" in headers and len(body) >= int(headers["content-length"]):
                return Answer(int(lines[0].split()[1]), headers, body, closed)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            closed = True
            if b"\r\n\r\n" not in data:
                return Answer(0, {}, data, closed)
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            return Answer(int(lines[0].split()[1]), headers, body, closed)
        data += chunk


def exchange(gw: Gateway, *parts: bytes, pause_s: float = 0.0) -> Answer:
    with connect(gw) as sock:
        for part in parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # refused before we finished: the answer is already there
            if pause_s:
                time.sleep(pause_s)
        return read_answer(sock)


def request_head(gw: Gateway, path: str = "/v1/chat/completions", **headers: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {gw.key}",
        "Content-Type: application/json",
        *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(gw: Gateway, body: bytes) -> Answer:
    return exchange(gw, request_head(gw, Content_Length=str(len(body))) + body)


def chat(**fields: Any) -> bytes:
    request = {"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({**request, **fields}).encode()


def assert_openai_error(answer: Answer, status: int, param: str | None = None) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert isinstance(error["message"], str)
    assert isinstance(error["type"], str)
    assert {"param", "code"} <= set(error)
    if param is not None:
        assert error["param"] == param


def served_normally(gw: Gateway) -> float:
    """Seconds a normal client waits for a normal answer."""
    began = time.monotonic()
    response = httpx.post(
        f"{gw.url}/v1/chat/completions",
        content=chat(max_tokens=5),
        headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return time.monotonic() - began


# -- request heads ----------------------------------------------------------------------------


def get_with_headers(gw: Gateway, headers: bytes) -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"


def test_a_header_over_64_kib_is_refused_with_431(gw: Gateway) -> None:
    answer = exchange(gw, get_with_headers(gw, b"X-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n"))
    assert_openai_error(answer, 431)
    assert answer.headers["connection"] == "close"


def test_a_hundred_thousand_headers_are_refused_with_431(gw: Gateway) -> None:
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(100_000))
    assert_openai_error(exchange(gw, get_with_headers(gw, headers)), 431)


def test_a_head_just_under_the_limit_is_served(gw: Gateway) -> None:
    answer = exchange(gw, get_with_headers(gw, b"X-Big: " + b"a" * 60_000 + b"\r\n"))
    assert answer.status == 200


def test_a_head_sent_in_small_pieces_is_served(gw: Gateway) -> None:
    head = get_with_headers(gw, b"X-Some: " + b"a" * 1000 + b"\r\n")
    answer = exchange(gw, *(head[i : i + 100] for i in range(0, len(head), 100)))
    assert answer.status == 200


def test_a_16_mib_header_does_not_grow_the_gateway(gw: Gateway) -> None:
    rss_before = gw.rss()
    with connect(gw) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        try:
            for _ in range(256):
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed early: the point
        answer = read_answer(sock)
    assert_openai_error(answer, 431)
    assert gw.rss() - rss_before < 4 * MiB


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"],
    ids=["nothing", "half a head"],
)
def test_a_head_that_does_not_arrive_in_time_gets_408(gw: Gateway, sent: bytes) -> None:
    with connect(gw) as sock:
        sock.sendall(sent)
        began = time.monotonic()
        answer = read_answer(sock)
    assert_openai_error(answer, 408)
    assert HEAD_TIMEOUT_S - 0.5 < time.monotonic() - began < HEAD_TIMEOUT_S + 2


def test_a_head_trickled_a_byte_at_a_time_gets_408(gw: Gateway) -> None:
    with connect(gw) as sock:
        began = time.monotonic()
        try:
            for byte in get_with_headers(gw, b"X-Slow: " + b"a" * 1000 + b"\r\n"):
                sock.sendall(bytes([byte]))
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us: the point
        answer = read_answer(sock)
    assert_openai_error(answer, 408)
    assert time.monotonic() - began < HEAD_TIMEOUT_S + 2


# -- bodies -----------------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(gw: Gateway) -> None:
    answer = exchange(gw, request_head(gw, Content_Length=str(BODY_LIMIT + 1)))
    assert_openai_error(answer, 413)


def test_a_chunked_body_over_the_limit_is_refused(gw: Gateway) -> None:
    chunk = b"4000\r\n" + b"a" * 0x4000 + b"\r\n"
    parts = [request_head(gw, Transfer_Encoding="chunked"), *[chunk] * 8, b"0\r\n\r\n"]
    assert_openai_error(exchange(gw, *parts), 413)


def test_a_body_sent_byte_by_byte_is_served(gw: Gateway) -> None:
    body = chat(max_tokens=3)
    head = request_head(gw, Content_Length=str(len(body)))
    answer = exchange(gw, head, *(body[i : i + 1] for i in range(len(body))), pause_s=0.005)
    assert answer.status == 200, answer
    assert answer.json()["object"] == "chat.completion"


def test_a_body_that_stops_arriving_gets_408(gw: Gateway) -> None:
    with connect(gw) as sock:
        sock.sendall(request_head(gw, Content_Length="1000") + b'{"model": "chat-sm')
        began = time.monotonic()
        answer = read_answer(sock)
    assert_openai_error(answer, 408)
    assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - began < BODY_TIMEOUT_S + 2


def test_deeply_nested_json_is_refused_with_400(gw: Gateway) -> None:
    depth = (BODY_LIMIT - 100) // 2
    body = b'{"model": "chat-small", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    assert_openai_error(post(gw, body), 400)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "chat-small", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "chat-\xc3", "messages": []}',
        bytes(range(256)),
    ],
    ids=["in a string", "cut sequence", "binary"],
)
def test_a_body_that_is_not_utf8_is_refused_with_400(gw: Gateway, body: bytes) -> None:
    assert_openai_error(post(gw, body), 400)


ABSURD = [-1, 0, 10**18, -(10**18), 2**64, 1.5, -0.5, "16", True, [16], {"n": 16}]


@pytest.mark.parametrize("field", ["n", "max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", ABSURD, ids=repr)
def test_absurd_counts_are_refused_with_422_naming_the_field(
    gw: Gateway, field: str, value: Any
) -> None:
    assert_openai_error(post(gw, chat(**{field: value})), 422, param=field)


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400", b"NaN", b"Infinity"])
def test_counts_json_cannot_hold_are_refused_with_400(gw: Gateway, literal: bytes) -> None:
    body = chat(n=1).replace(b'"n": 1', b'"n": ' + literal)
    assert_openai_error(post(gw, body), 400)


def test_whole_number_floats_are_counts(gw: Gateway) -> None:
    answer = post(gw, chat(n=2.0, max_tokens=3.0))
    assert answer.status == 200, answer
    assert len(answer.json()["choices"]) == 2


# -- idle connections -------------------------------------------------------------------------


def test_thousands_of_idle_connections_do_not_keep_a_normal_client_waiting(
    gw: Gateway,
) -> None:
    rss_before = gw.rss()
    partial = [
        b"",  # connected, sent nothing
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
        request_head(gw, Content_Length="1000") + b'{"model": "chat-sm',
    ]
    idle: list[socket.socket] = []
    try:
        for i in range(IDLE_CONNECTIONS):
            sock = connect(gw)
            sock.sendall(partial[i % len(partial)])
            idle.append(sock)
        deadline = time.monotonic() + 10
        while len(gw.process.net_connections("tcp")) < IDLE_CONNECTIONS:
            assert time.monotonic() < deadline, "the gateway did not accept every connection"
            time.sleep(0.05)
        waited = served_normally(gw)
        grown = gw.rss() - rss_before
    finally:
        for sock in idle:
            sock.close()
    print(
        f"{IDLE_CONNECTIONS} idle connections: normal request {waited * 1000:.0f} ms, "
        f"RSS +{grown / MiB:.1f} MiB"
    )
    assert waited < 2.0
    assert grown < 64 * MiB


def test_idle_connections_are_closed_after_the_head_timeout(gw: Gateway) -> None:
    idle = []
    try:
        for i in range(1000):
            sock = connect(gw)
            sock.sendall(b"" if i % 2 else b"GET /healthz HTTP/1.1\r\nHo")
            idle.append(sock)
        opened = time.monotonic()
        peak = 0
        while time.monotonic() < opened + HEAD_TIMEOUT_S / 2:
            peak = max(peak, len(gw.process.net_connections("tcp")))
            time.sleep(0.05)
        time.sleep(HEAD_TIMEOUT_S + 1)
        remaining = len(gw.process.net_connections("tcp"))
    finally:
        for sock in idle:
            sock.close()
    assert peak >= 900  # they were accepted ...
    assert remaining < 100  # ... and closed: what is left is Redis, the engine, the listener


# -- streams and slow readers -----------------------------------------------------------------


def stream_request(gw: Gateway, max_tokens: int) -> bytes:
    body = chat(stream=True, max_tokens=max_tokens)
    return request_head(gw, Content_Length=str(len(body))) + body


def test_clients_that_never_read_a_long_stream_cost_bounded_memory(gw: Gateway) -> None:
    rss_before = gw.rss()
    readers: list[socket.socket] = []
    peak = rss_before
    try:
        for _ in range(4):
            sock = connect(gw)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(stream_request(gw, LONG_STREAM_TOKENS))
            readers.append(sock)
        until = time.monotonic() + TOTAL_TIMEOUT_S - 1
        while time.monotonic() < until:
            peak = max(peak, gw.rss())
            time.sleep(0.1)
    finally:
        for sock in readers:
            sock.close()
    print(
        f"4 non-reading clients of {LONG_STREAM_TOKENS}-token streams: RSS "
        f"{rss_before / MiB:.1f} -> peak {peak / MiB:.1f} MiB"
    )
    assert peak - rss_before < 32 * MiB
    assert served_normally(gw) < 2.0


def read_until_closed(sock: socket.socket, within_s: float) -> tuple[bytes, bool]:
    """What the server sends within within_s, and whether it closed the connection by then."""
    deadline = time.monotonic() + within_s
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def connections_from(gw: Gateway, sock: socket.socket) -> int:
    port = sock.getsockname()[1]
    return sum(1 for c in gw.process.net_connections("tcp") if c.raddr and c.raddr.port == port)


def test_a_client_that_never_reads_is_cut_off_by_the_total_timeout(gw: Gateway) -> None:
    with connect(gw) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(stream_request(gw, LONG_STREAM_TOKENS))
        time.sleep(TOTAL_TIMEOUT_S + 1)  # reads nothing while the deadline passes
        held = connections_from(gw, sock)
        received, closed = read_until_closed(sock, within_s=3)
    print(f"never-reading client: {len(received)} bytes after the deadline, closed: {closed}")
    assert held == 0  # the gateway let go of the connection at the deadline
    assert received.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" not in received
    assert closed


def test_cutting_off_a_client_that_never_reads_logs_no_error(gw: Gateway) -> None:
    logged = len(gw.log())
    with connect(gw) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(stream_request(gw, LONG_STREAM_TOKENS))
        wait_for(lambda: "cut off" in gw.log()[logged:], timeout=TOTAL_TIMEOUT_S + 3)
    time.sleep(0.2)
    assert " ERROR " not in gw.log()[logged:]


def test_a_client_that_reads_slowly_gets_the_whole_stream(gw: Gateway) -> None:
    with connect(gw) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(stream_request(gw, 300))
        received = b""
        while not received.endswith(b"data: [DONE]\n\n") and b"0\r\n\r\n" not in received:
            chunk = sock.recv(1024)
            if not chunk:
                break
            received += chunk
            time.sleep(0.002)
    assert received.startswith(b"HTTP/1.1 200")
    assert received.count(b'"delta"') >= 300
    assert b"data: [DONE]" in received


def test_the_gateway_survived_and_logged_no_server_error(gw: Gateway) -> None:
    assert gw.proc.alive()
    assert served_normally(gw) < 2.0
    assert "unhandled error" not in gw.log()
    assert "Traceback" not in gw.log()
