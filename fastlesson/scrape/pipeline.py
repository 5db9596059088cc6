"""The scraper's orchestration: config, manifest entries, and the pipeline steps from search to placed files.

search (or --from-urls) -> download (concurrent, bounded) -> verify and normalise -> deduplicate ->
seeded split -> place files; every URL ends up in `manifest.json` with one of `STATUSES`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from fastlesson._io import atomic_write_bytes, write_json
from fastlesson.scrape.fetch import RETRY_HTTP, fetch_url
from fastlesson.scrape.image import JPEG_QUALITY, normalise_image, phash_distance
from fastlesson.scrape.search import DDGSBackend, SearchBackend, SearchHit, search_with_retry

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
STAGING = ".staging"  # hidden: fastai's get_image_files skips dot-folders
# every status an entry can end with; 'ok' is kept, everything else is a recorded rejection
STATUSES = ("ok", "http_error", "timeout", "network_error", "redirect_loop", "bad_url", "not_image",
            "too_large", "too_small", "bomb", "corrupt", "duplicate", "near_duplicate", "label_conflict")
_DOWNLOADED = "downloaded"  # internal: decoded fine, waiting for dedupe
_PERMANENT = {"not_image", "corrupt", "bomb", "too_small", "too_large", "redirect_loop", "bad_url"}
_DEDUPED = {"ok", "duplicate", "near_duplicate", "label_conflict"}


@dataclass
class ScrapeConfig:
    """Everything `scrape_dataset` needs; the CLI fills it and it is saved as `scrape_config.json`."""

    classes: list[str] = field(default_factory=list)  # search queries; folders get their sanitised names
    dest: str | Path = "data/scraped"
    n_images: int = 100  # results asked of the search backend, per class
    query_suffix: str = ""  # appended to every query, e.g. "photo" or "flower"
    type_image: str | None = "photo"  # ddgs filter: photo | clipart | gif | transparent | line
    size: str | None = None  # ddgs filter: Small | Medium | Large | Wallpaper
    license_image: str | None = None  # ddgs filter: any | Public | Share | ShareCommercially | Modify ...
    from_urls: str | Path | None = None  # JSON {"class": [urls]}, CSV class,url, or a previous manifest.json
    valid_pct: float = 0.2  # fraction of each class's kept images that goes to valid/
    seed: int = 42  # split seed
    max_size: int = 512  # px, longer side of the saved JPEG
    min_size: int = 64  # px, images whose shorter side is below this are rejected
    max_bytes: int = 10_000_000  # bytes, largest download accepted
    max_pixels: int = 40_000_000  # px (width*height), decompression-bomb cap, checked on the header
    timeout: float = 10.0  # s, per connect / per read
    max_seconds: float = 60.0  # s, whole download of one URL
    retries: int = 2  # extra attempts per URL on 5xx / 429 / timeout / network errors
    search_retries: int = 4  # extra attempts per search query
    backoff: float = 2.0  # s, first wait before a retry; doubles each time
    workers: int = 8  # concurrent downloads
    near_dup_bits: int = 6  # phash Hamming distance (of 64 bits) at or below which images are near-duplicates
    min_per_class: int = 10  # fewer kept images than this in a class -> non-zero exit
    progress: bool = True  # show a progress bar while downloading

    def settings(self) -> dict:
        """The settings that decide an image's status and bytes; resume reuses results only if they match."""
        return {"max_size": self.max_size, "min_size": self.min_size, "max_pixels": self.max_pixels,
                "max_bytes": self.max_bytes, "jpeg_quality": JPEG_QUALITY, "version": MANIFEST_VERSION}


@dataclass
class UrlEntry:
    """One (class, URL) pair and what happened to it; one manifest entry."""

    cls: str
    url: str
    query: str = ""
    source: str = ""  # page the image was found on
    title: str = ""
    license: str = ""
    status: str = "pending"
    reason: str = ""
    http_status: int | None = None
    sha256: str = ""  # of the normalised JPEG bytes; the file name is its first 16 hex digits
    phash: str = ""  # 64-bit perceptual hash of the normalised image, hex
    width: int = 0  # px, saved JPEG
    height: int = 0
    notes: str = ""  # what normalisation changed (first frame, EXIF rotation, alpha, ...)
    split: str = ""  # train | valid for kept images
    path: str = ""  # relative to dest, for kept images
    src: Path | None = field(default=None, repr=False)  # internal: where the normalised file is now

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("cls", "src")}
        return {"class": self.cls, **d}

    @classmethod
    def from_dict(cls, d: dict) -> UrlEntry:
        names = {f.name for f in fields(cls)} - {"cls", "src"}
        return cls(cls=d["class"], **{k: v for k, v in d.items() if k in names})


@dataclass
class ScrapeResult:
    """What `scrape_dataset` did: entries (one per URL), query outcomes, and the per-class summary."""

    dest: Path
    classes: list[str]  # class folder names
    entries: list[UrlEntry]
    queries: list[dict]
    min_per_class: int
    n_fetched: int  # URLs downloaded in this run (0 when everything was resumed)

    def counts(self) -> dict[str, Counter]:
        """Per class: Counter of statuses."""
        out = {c: Counter() for c in self.classes}
        for e in self.entries:
            out.setdefault(e.cls, Counter())[e.status] += 1
        return out

    def kept(self, cls: str) -> list[UrlEntry]:
        return [e for e in self.entries if e.cls == cls and e.status == "ok"]

    @property
    def short_classes(self) -> dict[str, int]:
        """Classes with fewer than `min_per_class` kept images -> their count."""
        return {c: n["ok"] for c, n in self.counts().items() if n["ok"] < self.min_per_class}

    def summary_table(self) -> str:
        """A Markdown table: per class found, kept (train/valid) and rejections by status."""
        counts = self.counts()
        rejected = [s for s in STATUSES[1:] if any(c[s] for c in counts.values())]
        head = ["class", "found", "kept", "train", "valid", *rejected]
        rows, total = [], Counter()
        for cls, c in counts.items():
            split = Counter(e.split for e in self.kept(cls))
            row = {"class": cls, "found": sum(c.values()), "kept": c["ok"], "train": split["train"],
                   "valid": split["valid"], **{s: c[s] for s in rejected}}
            total.update({k: v for k, v in row.items() if k != "class"})
            rows.append(row)
        rows.append({"class": "**total**", **{k: total[k] for k in head[1:]}})
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
        if self.queries:
            lines.append("")
        for q in self.queries:
            extra = f", {q['error']}" if q["error"] else ""
            lines.append(f"search {q['query']!r}: {q['status']}, {q['n_hits']} hits, "
                         f"{q['attempts']} attempt(s){extra}")
        return "\n".join(lines)


# ---------------------------------------------------------------- inputs

def class_folder(name: str) -> str:
    """A safe folder name for a class/query: runs of anything but letters, digits, '.', '-' become '_'."""
    folder = re.sub(r"[^\w.-]+", "_", name.strip()).strip("._")
    if not folder:
        raise ValueError(f"class name {name!r} has no usable characters; use letters or digits")
    return folder


def read_url_list(path: str | Path) -> dict[str, list[SearchHit]]:
    """{class: [SearchHit]} from JSON {"class": [urls]}, CSV `class,url[,source,license]`, or a manifest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from-urls file {path} not found; give a JSON or CSV list of image URLs")
    text = path.read_text(encoding="utf-8-sig")
    out: dict[str, list[SearchHit]] = defaultdict(list)
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--from-urls {path} is not valid JSON ({e})") from e
        if isinstance(data, dict) and isinstance(data.get("entries"), list):  # a previous manifest.json
            for e in data["entries"]:
                out[e["class"]].append(SearchHit(e["url"], e.get("source", ""), e.get("title", ""),
                                                 e.get("license", "")))
            return dict(out)
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f'--from-urls {path}: expected {{"class": ["url", ...]}} or a manifest.json')
        for cls, urls in data.items():
            for u in urls:
                hit = SearchHit(u) if isinstance(u, str) else SearchHit(
                    u["url"], u.get("source", ""), u.get("title", ""), u.get("license", ""))
                out[cls].append(hit)
        return dict(out)
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() == "class":
        rows = rows[1:]  # header
    for i, r in enumerate(rows, 1):
        if len(r) < 2 or not r[1].strip():
            raise ValueError(f"--from-urls {path} row {i} {r!r}: expected `class,url[,source,license]`")
        r = [c.strip() for c in r] + ["", ""]
        out[r[0]].append(SearchHit(r[1], r[2], "", r[3]))
    return dict(out)


def check_config(cfg: ScrapeConfig) -> None:
    """Raise ValueError / FileNotFoundError naming the bad option and its fix."""
    if not cfg.classes and not cfg.from_urls:
        raise ValueError("no classes: give class names (`scrape.py daisy horse --dest data/dh`) "
                         "or --from-urls FILE")
    checks = [
        (0 <= cfg.valid_pct < 1, f"--valid-pct {cfg.valid_pct} must be in [0, 1), e.g. 0.2"),
        (cfg.min_size >= 1, f"--min-size {cfg.min_size} must be >= 1 px"),
        (cfg.max_size >= cfg.min_size, f"--max-size {cfg.max_size} must be >= --min-size {cfg.min_size}"),
        (cfg.n_images >= 1, f"--n-images {cfg.n_images} must be >= 1"),
        (cfg.workers >= 1, f"--workers {cfg.workers} must be >= 1"),
        (cfg.retries >= 0 and cfg.search_retries >= 0, "--retries / --search-retries must be >= 0"),
        (0 <= cfg.near_dup_bits <= 64, f"--near-dup-bits {cfg.near_dup_bits} must be in [0, 64]"),
        (cfg.max_bytes > 0 and cfg.max_pixels > 0, "--max-bytes and --max-pixels must be > 0"),
        (cfg.timeout > 0 and cfg.max_seconds > 0, "--timeout and --max-seconds must be > 0 s"),
        (cfg.min_per_class >= 0, f"--min-per-class {cfg.min_per_class} must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    if cfg.from_urls and not Path(cfg.from_urls).is_file():
        raise FileNotFoundError(f"--from-urls file {cfg.from_urls} not found")


def load_manifest(dest: Path) -> dict:
    """The manifest of a previous run in `dest`, or {}."""
    p = dest / MANIFEST
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); delete it to start afresh") from e


# ---------------------------------------------------------------- pipeline steps

def _gather(cfg: ScrapeConfig, backend: SearchBackend | None, sleep) -> tuple[dict, list[dict]]:
    """{folder: (query, [SearchHit])} from --from-urls or the search backend, plus query outcomes."""
    lists = read_url_list(cfg.from_urls) if cfg.from_urls else {}
    wanted = cfg.classes or list(lists)
    folders = [class_folder(c) for c in wanted]
    clash = sorted({f for f in folders if folders.count(f) > 1})
    if clash:
        raise ValueError(f"classes {wanted} give the same folder name(s) {clash}; rename them")
    if cfg.from_urls:
        missing = [c for c in wanted if c not in lists]
        if missing:
            raise ValueError(f"class(es) {missing} not in --from-urls {cfg.from_urls}; it has {sorted(lists)}")
        return {class_folder(c): ("", lists[c]) for c in wanted}, []
    backend = backend or DDGSBackend(timeout=cfg.timeout)
    found, outcomes = {}, []
    filters = {"type_image": cfg.type_image, "size": cfg.size, "license_image": cfg.license_image}
    for cls in cfg.classes:
        query = f"{cls} {cfg.query_suffix}".strip()
        hits, outcome = search_with_retry(backend, class_folder(cls), query, cfg.n_images,
                                          retries=cfg.search_retries, backoff=cfg.backoff, sleep=sleep,
                                          **{k: v for k, v in filters.items() if v})
        found[class_folder(cls)] = (query, hits)
        outcomes.append(outcome.to_dict())
    return found, outcomes


def _merge_entries(found: dict, prev: dict, reuse: bool, dest: Path, keep_old: bool) -> list[UrlEntry]:
    """Previous entries first (so resume is stable), then new URLs; earlier results reused when valid.

    `keep_old`: keep previous URLs that are not in `found` (search results change between runs; a
    --from-urls list does not, and is authoritative).
    """
    prev_entries = [UrlEntry.from_dict(d) for d in prev.get("entries", [])]
    listed = {(cls, h.url) for cls, (_, hits) in found.items() for h in hits}
    entries: dict[tuple[str, str], UrlEntry] = {}
    for e in prev_entries:
        if e.cls in found and (e.cls, e.url) not in entries and (keep_old or (e.cls, e.url) in listed):
            entries[(e.cls, e.url)] = e if reuse else UrlEntry(e.cls, e.url, e.query, e.source, e.title,
                                                                e.license)
    for cls, (query, hits) in found.items():
        for h in hits:
            entries.setdefault((cls, h.url), UrlEntry(cls, h.url, query, h.source, h.title, h.license))
    for e in entries.values():
        if e.status in _DEDUPED:
            e.src = dest / e.path if e.path and (dest / e.path).is_file() else None
            if e.status == "ok" and e.src is None:
                e.status = "pending"  # its file was deleted: fetch again
            else:
                e.status = _DOWNLOADED  # dedupe and split run again over the whole set
        elif not (e.status in _PERMANENT or (e.status == "http_error" and e.http_status not in RETRY_HTTP)):
            e.status = "pending"  # new, or a transient failure worth another try
        if e.status == "pending":
            e.reason, e.sha256, e.phash, e.notes, e.src = "", "", "", "", None
        e.split = e.split if e.status == _DOWNLOADED else ""
    return list(entries.values())


def _fetch_one(url: str, staging: Path, cfg: ScrapeConfig, sleep) -> dict:
    """Download, verify and normalise one URL; the JPEG lands in `staging` named by its hash."""
    r = fetch_url(url, staging, timeout=cfg.timeout, max_seconds=cfg.max_seconds, max_bytes=cfg.max_bytes,
                  retries=cfg.retries, backoff=cfg.backoff, sleep=sleep)
    if r.status != "ok":
        return {"status": r.status, "reason": r.reason, "http_status": r.http_status}
    try:
        im = normalise_image(r.path, max_size=cfg.max_size, min_size=cfg.min_size, max_pixels=cfg.max_pixels)
    finally:
        r.path.unlink(missing_ok=True)
    if im.status != "ok":
        return {"status": im.status, "reason": im.reason, "http_status": 200}
    staged = staging / f"{im.sha256[:16]}.jpg"
    atomic_write_bytes(staged, im.data)
    return {"status": _DOWNLOADED, "reason": "", "http_status": 200, "sha256": im.sha256,
            "phash": im.phash, "width": im.width, "height": im.height, "notes": im.notes, "src": staged}


def _fetch_all(entries: list[UrlEntry], staging: Path, cfg: ScrapeConfig, sleep) -> int:
    """Fetch every pending entry (each distinct URL once) concurrently; returns the number of URLs fetched."""
    todo = [e for e in entries if e.status == "pending"]
    urls = list(dict.fromkeys(e.url for e in todo))
    if not urls:
        return 0
    results: dict[str, dict] = {}
    ex = ThreadPoolExecutor(max_workers=min(cfg.workers, len(urls)), thread_name_prefix="scrape")
    try:
        futures = {ex.submit(_fetch_one, u, staging, cfg, sleep): u for u in urls}
        done = as_completed(futures)
        if cfg.progress:
            from fastprogress.fastprogress import progress_bar
            done = progress_bar(done, total=len(futures))
        for fut in done:
            results[futures[fut]] = fut.result()
        if cfg.progress:
            print()  # end the console progress bar's line
    except BaseException:
        # Ctrl-C or a bug: drop queued downloads, let running ones clean up their temp files, re-raise
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown()
    for e in todo:
        for k, v in results[e.url].items():
            setattr(e, k, v)
    return len(urls)


def dedupe(entries: list[UrlEntry], max_bits: int = 6) -> None:
    """Mark downloaded entries ok / duplicate / near_duplicate / label_conflict, in place.

    Images whose 64-bit phashes differ in at most `max_bits` bits are grouped (transitively, so a chain of
    near-copies is one group). A group spanning several classes is a label conflict: all its members are
    dropped. Otherwise the first entry with a file (input order) is kept and the rest are duplicates (same
    normalised bytes) or near-duplicates. Grouping across classes before the split means no image can be
    in both train and valid.
    """
    cand = [e for e in entries if e.status == _DOWNLOADED]
    parent = list(range(len(cand)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    hashes = [int(e.phash, 16) for e in cand]
    for i in range(len(cand)):
        for j in range(i + 1, len(cand)):
            if (hashes[i] ^ hashes[j]).bit_count() <= max_bits:
                parent[find(j)] = find(i)
    groups: dict[int, list[UrlEntry]] = defaultdict(list)
    for i, e in enumerate(cand):
        groups[find(i)].append(e)
    for members in groups.values():
        classes = sorted({e.cls for e in members})
        if len(classes) > 1:
            for e in members:
                other = next(o for o in members if o.cls != e.cls)
                e.status = "label_conflict"
                e.reason = (f"same image also found for class(es) {[c for c in classes if c != e.cls]} "
                            f"(e.g. {other.url}); dropped from all")
            continue
        keep = next((e for e in members if e.src is not None and e.src.is_file()), members[0])
        keep.status = "ok"
        for e in members:
            if e is keep:
                continue
            if e.sha256 == keep.sha256:
                e.status, e.reason = "duplicate", f"same content as {keep.url}"
            else:
                d = phash_distance(e.phash, keep.phash)
                e.status = "near_duplicate"
                e.reason = f"phash distance {d} <= {max_bits} bits to {keep.url}"


def assign_split(entries: list[UrlEntry], valid_pct: float, seed: int) -> None:
    """Seeded per-class split of kept entries; ranks by hash(seed, content) so it ignores URL order."""
    by_cls: dict[str, list[UrlEntry]] = defaultdict(list)
    for e in entries:
        e.split, e.path = "", ""
        if e.status == "ok":
            by_cls[e.cls].append(e)
    for cls, es in by_cls.items():
        es.sort(key=lambda e: hashlib.sha256(f"{seed}:{e.sha256}".encode()).hexdigest())
        n_valid = round(len(es) * valid_pct)
        if valid_pct > 0 and len(es) >= 2:  # at least one image on each side
            n_valid = min(max(n_valid, 1), len(es) - 1)
        for i, e in enumerate(es):
            e.split = "valid" if i < n_valid else "train"
            e.path = f"{e.split}/{cls}/{e.sha256[:16]}.jpg"


def _place_files(entries: list[UrlEntry], dest: Path, old_paths: set[str]) -> None:
    """Move kept images to train|valid/class/, and remove files of earlier runs that are no longer kept."""
    targets = set()
    for e in entries:
        if e.status != "ok":
            continue
        target = dest / e.path
        targets.add(e.path)
        if e.src != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(e.src, target)
        e.src = target
    for p in old_paths - targets:  # only files this tool wrote (listed in the old manifest)
        (dest / p).unlink(missing_ok=True)


# ---------------------------------------------------------------- entry points

def scrape_dataset(cfg: ScrapeConfig, backend: SearchBackend | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> ScrapeResult:
    """Search (or read --from-urls), download, verify, dedupe and split into `cfg.dest`; resumable."""
    check_config(cfg)
    dest = Path(cfg.dest)
    dest.mkdir(parents=True, exist_ok=True)
    prev = load_manifest(dest)
    found, queries = _gather(cfg, backend, sleep)
    dropped = sorted({e["class"] for e in prev.get("entries", [])} - set(found))
    if dropped:
        raise ValueError(f"{dest} already holds class(es) {dropped} from an earlier run; "
                         f"ask for them too or use a new --dest")
    reuse = prev.get("settings") == cfg.settings()
    entries = _merge_entries(found, prev, reuse, dest, keep_old=not cfg.from_urls)
    old_paths = {e["path"] for e in prev.get("entries", []) if e.get("path")}
    staging = dest / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
    staging.mkdir()
    try:
        n_fetched = _fetch_all(entries, staging, cfg, sleep)
        dedupe(entries, cfg.near_dup_bits)
        lost = [e for e in entries if e.status == "ok" and (e.src is None or not e.src.is_file())]
        if lost:  # a kept image whose file is gone (e.g. it was dropped as a conflict before): fetch again
            for e in lost:
                e.status = "pending"
            n_fetched += _fetch_all(lost, staging, cfg, sleep)
            for e in lost:
                e.status = "ok" if e.status == _DOWNLOADED else e.status
        assign_split(entries, cfg.valid_pct, cfg.seed)
        _place_files(entries, dest, old_paths)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = ScrapeResult(dest, list(found), entries, queries, cfg.min_per_class, n_fetched)
    _write_outputs(cfg, result)
    return result


def _write_outputs(cfg: ScrapeConfig, result: ScrapeResult) -> None:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    manifest = {
        "version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": cfg.settings(),
        "config": config,
        "from_urls": str(cfg.from_urls) if cfg.from_urls else None,
        "queries": result.queries,
        "summary": {c: dict(n) for c, n in result.counts().items()},
        "entries": [e.to_dict() for e in result.entries],
    }
    write_json(result.dest / MANIFEST, manifest, indent=1)
    write_json(result.dest / "scrape_config.json", config, indent=1)


def run_scrape(cfg: ScrapeConfig, backend: SearchBackend | None = None) -> int:
    """CLI body: scrape, print the summary table, return 1 (naming the classes) when a class is short."""
    result = scrape_dataset(cfg, backend)
    print(result.summary_table())
    print(f"\nmanifest: {result.dest / MANIFEST}  ({result.n_fetched} URLs fetched this run)")
    short = result.short_classes
    if short:
        failed = {q["cls"] for q in result.queries if q["status"] != "ok"}
        names = ", ".join(f"{c!r} has {n}" + (" (its search failed)" if c in failed else "")
                          for c, n in short.items())
        print(f"error: too few images: {names} (--min-per-class {cfg.min_per_class}); "
              f"ask for more with --n-images, or lower --min-per-class", file=sys.stderr)
        return 1
    return 0
