"""A local HTTP server that answers like the Hugging Face Hub for the calls a pull makes.

- `GET /api/models/{org}/{name}/revision/{rev}?blobs=true` (HfApi.model_info): the commit
  and, per file, size + git blob id, or `lfs: {sha256, size}` for large files.
- `HEAD /{org}/{name}/resolve/{rev}/{path}` (get_hf_file_metadata): `X-Repo-Commit`, `ETag`
  (git blob id) for small files; for LFS files a 302 to a second server (the "CDN") with
  `X-Linked-Etag` (sha256) and `X-Linked-Size`, as the real Hub does.
- `GET` of those URLs, honouring `Range: bytes=N-` (206 + Content-Range).

Every request is recorded (method, path, Range, Authorization) for the tests to assert on.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    served: dict[str, bytes] = field(default_factory=dict)
    """Bytes to serve instead of the real content (to simulate corruption in transit)."""
    throttle: dict[str, float] = field(default_factory=dict)
    """Seconds to sleep between chunks of a file (to interrupt a pull mid-file)."""
    chunk: int = 65536


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    auth: str | None


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        """(repo_id, revision or commit) -> Repo."""
        self.requests: list[Request] = []
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self.hub = self._server(cdn=False)
        self.cdn = self._server(cdn=True)
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def add(self, repo_id: str, revision: str, repo: Repo) -> None:
        self.repos[(repo_id, revision)] = repo
        self.repos[(repo_id, repo.commit)] = repo

    def _server(self, cdn: bool) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._handle(head=True)

            def do_GET(self) -> None:
                self._handle(head=False)

            def _handle(self, head: bool) -> None:
                path = urlsplit(self.path).path
                with hub._lock:
                    hub.requests.append(
                        Request(
                            self.command,
                            path,
                            self.headers.get("Range"),
                            self.headers.get("Authorization"),
                        )
                    )
                parts = [unquote(p) for p in path.strip("/").split("/")]
                if cdn:
                    # /{org}/{name}/{commit}/{path...}
                    repo = hub.repos.get((f"{parts[0]}/{parts[1]}", parts[2]))
                    name = "/".join(parts[3:])
                    if repo is None or name not in repo.files:
                        return self._send(404, b"not found", {})
                    return self._file(repo, name, head)
                if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
                    return self._info(f"{parts[2]}/{parts[3]}", parts[5])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, rev, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                    repo = hub.repos.get((repo_id, rev))
                    if repo is None:
                        return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"})
                    if name not in repo.files:
                        return self._send(
                            404,
                            b"",
                            {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit},
                        )
                    data = repo.files[name]
                    if name in repo.lfs:
                        location = f"{hub.cdn_url}/{repo_id}/{repo.commit}/{name}"
                        return self._send(
                            302,
                            b"",
                            {
                                "Location": location,
                                "X-Repo-Commit": repo.commit,
                                "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                "X-Linked-Size": str(len(data)),
                                "ETag": f'"{git_sha1(data)}"',
                            },
                        )
                    return self._file(repo, name, head, {"X-Repo-Commit": repo.commit})
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"})

            def _info(self, repo_id: str, rev: str) -> None:
                repo = hub.repos.get((repo_id, rev))
                if repo is None:
                    return self._send(
                        404, b'{"error":"Revision Not Found"}', {"X-Error-Code": "RevisionNotFound"}
                    )
                siblings = []
                for name, data in repo.files.items():
                    sib: dict[str, Any] = {"rfilename": name, "size": len(data)}
                    if name in repo.lfs:
                        sib["blobId"] = git_sha1(b"version https://git-lfs ... pointer " + data[:8])
                        sib["lfs"] = {
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "size": len(data),
                            "pointerSize": 134,
                        }
                    else:
                        sib["blobId"] = git_sha1(data)
                    siblings.append(sib)
                body = orjson.dumps(
                    {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings}
                )
                self._send(200, body, {"Content-Type": "application/json"})

            def _file(
                self, repo: Repo, name: str, head: bool, extra: dict[str, str] | None = None
            ) -> None:
                data = repo.served.get(name, repo.files[name])
                headers = dict(extra or {})
                headers["ETag"] = (
                    f'"{hashlib.sha256(repo.files[name]).hexdigest()}"'
                    if name in repo.lfs
                    else f'"{git_sha1(repo.files[name])}"'
                )
                headers["Accept-Ranges"] = "bytes"
                start = 0
                rng = self.headers.get("Range")
                status = 200
                if rng and rng.startswith("bytes=") and not head:
                    start = int(rng[len("bytes=") :].split("-")[0])
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if head:
                    headers["Content-Length"] = str(len(data))
                    return self._send(200, b"", headers, length=len(data))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                delay = repo.throttle.get(name, 0.0)
                try:
                    for i in range(0, len(body), repo.chunk):
                        chunk = body[i : i + repo.chunk]
                        self.wfile.write(chunk)
                        with hub._lock:
                            hub.bytes_sent += len(chunk)
                        if delay:
                            self.wfile.flush()
                            time.sleep(delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(
                self, status: int, body: bytes, headers: dict[str, str], length: int | None = None
            ) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def close(self) -> None:
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()
