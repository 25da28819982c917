"""A local HTTP file server with fault injection, for download tests (not a test module).

    with serve(root, truncate={"a.gz": (1000, 1)}, corrupt={"b.zip"}) as url:
        fetch(url + "a.gz", ...)
        assert url.count("a.gz") == 2 and url.requests[1].range == "bytes=1000-"

Serves the files under `root` over HTTP/1.0 on 127.0.0.1 and a free port, with `Range: bytes=N-`
(206 + Content-Range, 416 past the end) and 404 for missing files. Faults, keyed by the path
relative to root:
- `truncate={"p": n}`: every response for p announces the full Content-Length but the
  connection is closed after n body bytes; `{"p": (n, times)}` does so for the first `times`
  responses only. `truncate_reset=True` aborts those connections with a TCP reset instead.
- `corrupt={"p"}`: one byte in the middle of p is flipped (same size, different sha256).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Request:
    path: str  # relative to root, e.g. "a.gz"
    range: str | None  # the Range header as sent, or None
    user_agent: str | None
    status: int  # the status code the server answered with


class ServedURL(str):
    """The base URL (``http://127.0.0.1:PORT/``) plus the log of requests the server saw."""

    requests: list[Request]

    def count(self, path: str) -> int:
        """How many requests were made for `path`."""
        return sum(r.path == path for r in self.requests)

    def for_path(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]


def _flip_middle(data: bytes) -> bytes:
    if not data:
        return data
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


@contextlib.contextmanager
def serve(root: Path, *, truncate: dict[str, int | tuple[int, int]] | None = None,
          corrupt: set[str] | None = None, truncate_reset: bool = False) -> Iterator[ServedURL]:
    """Serve `root` in a background thread for the duration of the `with` block."""
    root = Path(root).resolve()
    faults = {p: (v, float("inf")) if isinstance(v, int) else v for p, v in (truncate or {}).items()}
    corrupt = set(corrupt or ())
    log: list[Request] = []
    lock = threading.Lock()
    truncated_so_far: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold a handler thread forever

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _record(self, rel: str, status: int) -> None:
            with lock:
                log.append(Request(rel, self.headers.get("Range"), self.headers.get("User-Agent"), status))

        def do_GET(self) -> None:
            rel = unquote(urlsplit(self.path).path).lstrip("/")
            file = (root / rel).resolve()
            if not file.is_relative_to(root) or not file.is_file():
                self._record(rel, 404)
                self.send_error(404, "Not Found")
                return
            data = file.read_bytes()
            if rel in corrupt:
                data = _flip_middle(data)
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng is not None:
                if not (rng.startswith("bytes=") and rng.endswith("-") and rng[6:-1].isdigit()):
                    self._record(rel, 400)
                    self.send_error(400, "only 'Range: bytes=N-' is supported")
                    return
                start, status = int(rng[6:-1]), 206
                if start >= len(data):
                    self._record(rel, 416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            body = data[start:]
            with lock:
                cut, times = faults.get(rel, (None, 0))
                if cut is not None and truncated_so_far.get(rel, 0) < times:
                    truncated_so_far[rel] = truncated_so_far.get(rel, 0) + 1
                else:
                    cut = None
            self._record(rel, status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
            if cut is not None:
                self.close_connection = True
                if truncate_reset:  # SO_LINGER 0: close() sends RST instead of FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = ServedURL(f"http://127.0.0.1:{server.server_address[1]}/")
    url.requests = log
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
