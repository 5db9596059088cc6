"""Image search behind a small backend interface, with bounded retries and a recorded outcome per query."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

MAX_BACKOFF = 60.0  # s, longest single wait between two search attempts


@dataclass
class SearchHit:
    """One image found by a search backend."""

    url: str  # the image itself
    source: str = ""  # the page the image was found on
    title: str = ""
    license: str = ""  # only when the backend reports one


@dataclass
class QueryOutcome:
    """What happened to one search query: status 'ok', 'empty' or 'failed'."""

    cls: str
    query: str
    status: str
    attempts: int
    n_hits: int = 0
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class SearchBackend(Protocol):
    """Anything with `search(query, max_results, **filters) -> list[SearchHit]`; raise on failure."""

    name: str

    def search(self, query: str, max_results: int, **filters: Any) -> list[SearchHit]: ...


def _import_ddgs():
    """The DDGS class from `ddgs`, or from its former name `duckduckgo_search`."""
    try:
        from ddgs import DDGS
    except ImportError:
        try:
            from duckduckgo_search import DDGS
        except ImportError as e:
            raise ImportError("image search needs the `ddgs` package: pip install ddgs "
                              "(or pass --from-urls FILE to skip searching)") from e
    return DDGS


class DDGSBackend:
    """DuckDuckGo (and other engines) image search through `ddgs`; filters: type_image, size, license_image."""

    name = "ddgs"
    FILTERS = ("type_image", "size", "license_image", "color", "layout")

    def __init__(self, timeout: float = 10.0, region: str = "us-en", safesearch: str = "moderate"):
        self.ddgs_cls = _import_ddgs()
        self.timeout, self.region, self.safesearch = timeout, region, safesearch

    def search(self, query: str, max_results: int, **filters: Any) -> list[SearchHit]:
        unknown = set(filters) - set(self.FILTERS)
        if unknown:
            raise ValueError(f"unknown ddgs image filter(s) {sorted(unknown)}; use {self.FILTERS}")
        kw = {k: v for k, v in filters.items() if v}
        ddgs = self.ddgs_cls(timeout=int(self.timeout))
        # positional query: the parameter is `query` in ddgs and `keywords` in duckduckgo_search
        rows = ddgs.images(query, region=self.region, safesearch=self.safesearch,
                           max_results=max_results, **kw)
        return [SearchHit(url=r.get("image", ""), source=r.get("url", ""), title=r.get("title", ""),
                          license=r.get("license", "") or "") for r in rows if r.get("image")]


class StaticBackend:
    """A backend that answers from a dict {query: [urls]}: for tests and offline demos."""

    name = "static"

    def __init__(self, results: dict[str, list[str]]):
        self.results = results

    def search(self, query: str, max_results: int, **filters: Any) -> list[SearchHit]:
        return [SearchHit(url=u) for u in self.results.get(query, [])[:max_results]]


def search_with_retry(backend: SearchBackend, cls: str, query: str, max_results: int, *,
                      retries: int = 4, backoff: float = 2.0, sleep: Callable[[float], None] = time.sleep,
                      **filters: Any) -> tuple[list[SearchHit], QueryOutcome]:
    """Run one query, retrying any backend error up to `retries` times with exponential backoff."""
    # ddgs reports rate limits as generic DDGSException/TimeoutException, so every error is retried
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(min(backoff * 2 ** (attempt - 1), MAX_BACKOFF))
        try:
            hits = backend.search(query, max_results, **filters)
        except ValueError:
            raise  # a bad filter is the caller's mistake, not a transient failure
        except Exception as e:  # noqa: BLE001 - recorded in the outcome and retried
            error = f"{type(e).__name__}: {e}"
            continue
        hits = hits[:max_results]
        status = "ok" if hits else "empty"
        return hits, QueryOutcome(cls, query, status, attempt + 1, len(hits))
    return [], QueryOutcome(cls, query, "failed", retries + 1, 0, error)
