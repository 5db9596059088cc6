"""A loopback HTTP server for offline scraping: fixed routes and/or a folder, on 127.0.0.1.

The one home for the scraper tests' server (tests/_scrape_server.py adds the bad-image routes) and
the scraping notebook's offline stand-in for the web.
"""

from __future__ import annotations

import mimetypes
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["LoopbackServer", "Response", "Route"]

# (status, headers, body); a body that is an iterable of byte chunks is streamed with no
# Content-Length and the connection closed after it (a client must stop reading on its own)
Response = tuple[int, dict, bytes | Iterable[bytes]]
# a fixed Response, or a function (query string, how many times this path+query was asked) -> Response
Route = Response | Callable[[str, int], Response]
NOT_FOUND: Response = (404, {}, b"no such route")


class LoopbackServer:
    """HTTP on 127.0.0.1:<free port> from a daemon thread: `routes` first, then files under `folder`.

    GET only; the query string picks a route function's answer but not a file; anything else is
    404. `hits` counts requests per path+query. Use as a context manager (or start() / close()).
    """

    def __init__(self, routes: dict[str, Route] | None = None, folder: str | Path | None = None):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"folder={folder!r} is not a directory: pass the folder to serve")
        self.routes, self.hits = dict(routes or {}), Counter()
        self.folder = Path(folder).resolve() if folder is not None else None
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        """The full URL of `path` ("/x.jpg") on this server."""
        return self.base + path

    def respond(self, full_path: str) -> Response:
        """Count the request and answer it: a route, else a file under `folder`, else 404."""
        with self.lock:
            self.hits[full_path] += 1
            n = self.hits[full_path]
        path, _, query = full_path.partition("?")
        spec = self.routes.get(path)
        if callable(spec):
            return spec(query, n)
        if spec is not None:
            return spec
        return self._file(path) if self.folder is not None else NOT_FOUND

    def _file(self, path: str) -> Response:
        target = (self.folder / path.lstrip("/")).resolve()
        if not target.is_file() or not target.is_relative_to(self.folder):
            return NOT_FOUND
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return 200, {"Content-Type": ctype}, target.read_bytes()

    def start(self) -> LoopbackServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _handler(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # no request log in tests or notebooks
            pass

        def do_GET(self):
            status, headers, body = server.respond(self.path)
            streamed = not isinstance(body, (bytes, bytearray))
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if not streamed and "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for chunk in body if streamed else (body,):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a size cap or a timeout), as it may
            if streamed:
                self.close_connection = True

    return Handler
