"""Download one URL to a temporary file: timeouts, a size cap, retries, manual redirects, magic-byte check."""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

CHUNK = 64 * 1024  # bytes read per socket call
MAX_REDIRECTS = 5
USER_AGENT = "Mozilla/5.0 (compatible; fastlesson-scrape/0.1; +https://github.com/fastai/fastai)"
REDIRECT_CODES = (301, 302, 303, 307, 308)
RETRY_HTTP = (408, 425, 429, 500, 502, 503, 504)  # transient server answers worth another try

# first bytes -> format; the content decides, never the extension or Content-Type
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes, or None (HTML, SVG, empty, anything else)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in SIGNATURES if head.startswith(sig)), None)


def describe_non_image(head: bytes) -> str:
    """A short human reason for content that is not a supported image."""
    if not head:
        return "empty body (0 bytes)"
    text = head[:512].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "HTML page, not an image"
    if text.startswith(b"<svg") or b"<svg" in text:
        return "SVG (vector image, not supported)"
    return f"unknown content starting with {head[:8]!r}"


@dataclass
class FetchResult:
    """Outcome of one download; `path` is a complete temporary file when status == 'ok'."""

    url: str
    status: str  # ok | http_error | timeout | network_error | redirect_loop | bad_url | too_large | not_image
    reason: str = ""
    path: Path | None = None
    http_status: int | None = None
    final_url: str = ""
    attempts: int = 0
    fmt: str = ""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Let 3xx surface as HTTPError so redirects are followed (and loops caught) by `fetch_url`."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _read_chunks(resp) -> Iterator[bytes]:
    """Yield the body in chunks (a seam for tests that interrupt a download midway)."""
    while chunk := resp.read(CHUNK):
        yield chunk


class _Fail(Exception):
    def __init__(self, status: str, reason: str, http_status: int | None = None, transient=False):
        super().__init__(reason)
        self.status, self.reason, self.http_status, self.transient = status, reason, http_status, transient


def _open(url: str, timeout: float):
    """Open `url`, following redirects by hand; raises _Fail."""
    seen = [url]
    while True:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.8"})
        try:
            return _OPENER.open(req, timeout=timeout), url
        except urllib.error.HTTPError as e:
            e.close()
            if e.code not in REDIRECT_CODES:
                raise _Fail("http_error", f"HTTP {e.code} {e.reason}", e.code, e.code in RETRY_HTTP) from e
            location = e.headers.get("Location")
            if not location:
                raise _Fail("http_error", f"HTTP {e.code} redirect without Location", e.code) from e
            url = urljoin(url, location)
            if url in seen:
                raise _Fail("redirect_loop", f"redirect loop back to {url} after {len(seen)} hop(s)") from e
            if len(seen) > MAX_REDIRECTS:
                raise _Fail("redirect_loop", f"more than {MAX_REDIRECTS} redirects") from e
            seen.append(url)
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Fail("timeout", f"no answer within {timeout:g} s", transient=True) from e
            raise _Fail("network_error", f"{e.reason}", transient=True) from e
        except TimeoutError as e:
            raise _Fail("timeout", f"no answer within {timeout:g} s", transient=True) from e
        except (OSError, ValueError) as e:  # connection reset, malformed URL or status line
            raise _Fail("network_error", f"{type(e).__name__}: {e}", transient=True) from e


def _download_once(url: str, dest_dir: Path, timeout: float, max_seconds: float,
                   max_bytes: int) -> tuple[Path, str, str]:
    """One attempt: stream the body to a temporary file in `dest_dir`; returns (path, final_url, format)."""
    resp, final_url = _open(url, timeout)
    fd, tmp = tempfile.mkstemp(suffix=".part", dir=dest_dir)
    tmp = Path(tmp)
    try:
        with resp, os.fdopen(fd, "wb") as f:
            if resp.status != 200:
                raise _Fail("http_error", f"HTTP {resp.status} (expected 200)", resp.status)
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise _Fail("too_large", f"Content-Length {int(length)} bytes > max {max_bytes}")
            start, size, fmt = time.monotonic(), 0, None
            try:
                for chunk in _read_chunks(resp):
                    if size == 0:
                        fmt = sniff_format(chunk[:16])
                        if fmt is None:  # stop early: no need to fetch the rest of an HTML page
                            raise _Fail("not_image", describe_non_image(chunk))
                    size += len(chunk)
                    if size > max_bytes:
                        raise _Fail("too_large", f"body over max {max_bytes} bytes")
                    if time.monotonic() - start > max_seconds:
                        raise _Fail("timeout", f"download took over {max_seconds:g} s", transient=True)
                    f.write(chunk)
            except TimeoutError as e:
                raise _Fail("timeout", f"body stalled for {timeout:g} s", transient=True) from e
            except OSError as e:  # connection reset or incomplete read midway
                raise _Fail("network_error", f"{type(e).__name__}: {e}", transient=True) from e
            if size == 0:
                raise _Fail("not_image", describe_non_image(b""))
        return tmp, final_url, fmt
    except BaseException:
        # any failure, KeyboardInterrupt included, leaves no partial file behind
        tmp.unlink(missing_ok=True)
        raise


def fetch_url(url: str, dest_dir: Path, *, timeout: float = 10.0, max_seconds: float = 60.0,
              max_bytes: int = 10_000_000, retries: int = 2, backoff: float = 1.0,
              sleep: Callable[[float], None] = time.sleep) -> FetchResult:
    """Download `url` (query string kept) into a temp file under `dest_dir`, retrying transient errors."""
    if urlsplit(url).scheme not in ("http", "https"):
        return FetchResult(url, "bad_url", f"unsupported URL scheme in {url[:60]!r} (need http/https)")
    fail = None
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            path, final_url, fmt = _download_once(url, dest_dir, timeout, max_seconds, max_bytes)
            return FetchResult(url, "ok", "", path, 200, final_url, attempt + 1, fmt)
        except _Fail as e:
            fail = e
            if not e.transient:
                break
    reason = fail.reason + (f" (after {attempt + 1} attempts)" if fail.transient else "")
    return FetchResult(url, fail.status, reason, None, fail.http_status, "", attempt + 1)
