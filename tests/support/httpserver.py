"""A real HTTP server on loopback serving files from a directory, with faults on demand.

Runs ``http.server`` in a thread of the test process (a real socket, real HTTP/1.1, Range
requests answered with 206). Knobs, all changeable while it runs:

    with FileServer(tmp_path) as srv:
        srv.url("disk.raw")              # http://127.0.0.1:<port>/disk.raw
        srv.drop_after = 1 << 20         # cut the next body after 1 MiB (once)
        srv.rate = 256 << 10             # serve at 256 KiB/s
        srv.content_type = "text/plain"  # wrong Content-Type on every file
        srv.html_for_missing = True      # 200 + an HTML page instead of 404
        srv.redirects["old.raw"] = "ftp://elsewhere/x"   # 302 to another scheme
        srv.head_allowed = False         # 405 to HEAD
        srv.requests                     # [(method, path, range header), ...]
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

HTML_404 = (b"<!DOCTYPE html><html><head><title>Not Found</title></head>"
            b"<body><h1>404 - the page you asked for is not here</h1></body></html>")


class FileServer:
    """Serves ``root`` on 127.0.0.1 at a free port until closed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.drop_after: int | None = None
        self.rate: int | None = None
        self.content_type: str | None = None
        self.html_for_missing = False
        self.redirects: dict[str, str] = {}
        self.head_allowed = True
        self.requests: list[tuple[str, str, str]] = []
        self.drops = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                if not server.head_allowed:
                    self.send_response(405)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server._serve(self, body=False)

            def do_GET(self) -> None:
                server._serve(self, body=True)

        class Quiet(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                """A client that hangs up mid-body (a cancel, a cut) is part of the tests."""

        self._httpd = Quiet(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def gets(self, path: str) -> list[str]:
        """The Range headers of the GET requests for ``path`` ("" when none)."""
        return [r for m, p, r in self.requests if m == "GET" and p == "/" + path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        rel = h.path.split("?", 1)[0].lstrip("/")
        rng = h.headers.get("Range", "")
        with self._lock:
            self.requests.append((h.command, "/" + rel, rng))
        if rel in self.redirects:
            h.send_response(302)
            h.send_header("Location", self.redirects[rel])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        path = (self.root / rel).resolve()
        if not path.is_file() or not path.is_relative_to(self.root.resolve()):
            status, data = (200, HTML_404) if self.html_for_missing else (404, HTML_404)
            h.send_response(status)
            h.send_header("Content-Type", "text/html; charset=utf-8")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if body:
                h.wfile.write(data)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        if rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start = int(first)
            end = int(last) if last else size - 1
            if start >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            h.send_response(200)
        h.send_header("Content-Type", self.content_type or "application/octet-stream")
        h.send_header("Content-Length", str(end - start + 1))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{int(path.stat().st_mtime_ns)}-{size}"')
        h.end_headers()
        if body:
            self._send(h, path, start, end - start + 1)

    def _send(self, h: http.server.BaseHTTPRequestHandler, path: Path, start: int,
              length: int) -> None:
        with self._lock:
            cut, self.drop_after = self.drop_after, None
        if cut is None and not self.rate:
            h.wfile.flush()
            with path.open("rb") as f, contextlib.suppress(OSError):
                h.connection.sendfile(f, start, length)
            return
        began = time.monotonic()
        sent = 0
        block = 1 << 16 if self.rate else 1 << 20
        with path.open("rb") as f:
            f.seek(start)
            while sent < length:
                n = min(block, length - sent)
                if cut is not None and sent + n > cut:
                    n = cut - sent
                data = f.read(n)
                try:
                    h.wfile.write(data)
                except OSError:
                    return
                sent += len(data)
                if cut is not None and sent >= cut:
                    self.drops += 1
                    h.wfile.flush()
                    h.connection.shutdown(2)  # the peer sees the body end early
                    h.close_connection = True
                    return
                if self.rate:
                    ahead = sent / self.rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)  # pacing the stream, not waiting for a result


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[FileServer]:
    """A FileServer over ``tmp_path/www`` for one test."""
    root = tmp_path / "www"
    root.mkdir()
    with FileServer(root) as server:
        yield server


def main() -> None:
    """``python -m tests.support.httpserver DIR``: serve DIR from another process (benchmarks,
    where a server thread would share the client's GIL); prints the port, then serves until
    stdin closes."""
    import sys

    with FileServer(Path(sys.argv[1])) as server:
        print(server.port, flush=True)
        sys.stdin.read()


def make_sparse_raw(path: Path, size: int, seed: int = 1) -> Path:
    """A RAW disk of ``size`` bytes: a few MiB of pseudo-random data, the rest holes."""
    import random

    rnd = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, max(size // 4, 1 << 20)):
            f.seek(offset)
            f.write(rnd.randbytes(min(1 << 20, size - offset)))
    os.utime(path, (1_700_000_000, 1_700_000_000))
    return path


if __name__ == "__main__":
    main()
