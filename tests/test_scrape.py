"""scrape: every bad case served by a loopback server is handled and recorded; resume; interruption; split."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import runpy
import socket
import struct
import subprocess
import sys
import urllib.error
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageFile

import fastlesson.scrape.fetch as scrape_fetch
from fastlesson.images import to_rgb
from fastlesson.loopback import LoopbackServer
from fastlesson.scrape import (
    STATUSES,
    DDGSBackend,
    ScrapeConfig,
    SearchHit,
    StaticBackend,
    UrlEntry,
    assign_split,
    class_folder,
    normalise_image,
    phash_distance,
    read_url_list,
    scrape_dataset,
    search_with_retry,
)

from _scrape_server import ScrapeServer, build_routes, encode, exif_rotated_jpeg, pattern, png_bomb

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000  # bytes, small so the oversized routes trip it quickly

# URL path -> expected status, per class
EXPECTED = {
    "daisy": {
        **{f"/good/daisy/{i}.jpg": "ok" for i in (0, 2, 3, 4, 5, 6)},
        "/good/daisy/1.jpg": "label_conflict",
        "/dup-copy.jpg": "duplicate",
        "/near-copy.jpg": "near_duplicate",
        "/missing.jpg": "http_error",
        "/error.jpg": "http_error",
        "/flaky.jpg": "ok",
        "/slow.jpg": "timeout",
        "/loop/a": "redirect_loop",
        "/page.jpg": "not_image",
        "/empty.jpg": "not_image",
        "/truncated.jpg": "corrupt",
        "/vector.svg": "not_image",
        "/bomb.png": "bomb",
        "/cmyk.jpg": "ok",
        "/rgba.png": "ok",
        "/select?id=1": "ok",
        "/select?id=2": "ok",
        "/huge.jpg": "too_large",
        "/huge-declared.jpg": "too_large",
    },
    "horse": {
        **{f"/good/horse/{i}.jpg": "ok" for i in range(7)},
        "/cross.jpg": "label_conflict",
        "/moved.jpg": "ok",
        "/palette.png": "ok",
        "/anim.gif": "ok",
        "/exif.jpg": "ok",
        "/gray16.png": "ok",
        "/tiny.png": "too_small",
        "/missing.jpg": "http_error",
    },
}


class Sleeps(list):
    """An injectable sleep that records the waits instead of waiting."""

    def __call__(self, s: float) -> None:
        self.append(s)


def small_cfg(dest, **kw) -> ScrapeConfig:
    base = dict(dest=dest, min_size=32, max_size=64, max_bytes=MAX_BYTES, timeout=0.4, max_seconds=5,
                retries=1, backoff=0.5, workers=4, min_per_class=3, progress=False)
    return ScrapeConfig(**{**base, **kw})


def write_urls(path: Path, server: ScrapeServer, spec: dict) -> Path:
    path.write_text(json.dumps({c: [server.url(u) for u in urls] for c, urls in spec.items()}))
    return path


@pytest.fixture(scope="module")
def server():
    routes = {**build_routes(max_bytes=MAX_BYTES), **format_routes()}
    with ScrapeServer(routes, MAX_BYTES) as s:
        yield s


@pytest.fixture(scope="module")
def scraped(server, tmp_path_factory):
    """One full run over every case; tests below only read its results."""
    tmp = tmp_path_factory.mktemp("scrape")
    urls = write_urls(tmp / "urls.json", server, EXPECTED)
    hits_before = server.hits.copy()
    result = scrape_dataset(small_cfg(tmp / "data", from_urls=urls), sleep=Sleeps())
    hits = server.hits - hits_before
    return result, hits


def by_path(result, server):
    return {(e.cls, e.url.removeprefix(server.base)): e for e in result.entries}


def test_every_url_has_its_expected_status(scraped, server):
    result, _ = scraped
    got = by_path(result, server)
    expected = {(c, u): s for c, d in EXPECTED.items() for u, s in d.items()}
    assert {k: e.status for k, e in got.items()} == expected
    assert all(e.status in STATUSES for e in result.entries)
    assert all(e.reason for e in result.entries if e.status != "ok"), "every rejection has a reason"
    manifest = json.loads((result.dest / "manifest.json").read_text())
    assert len(manifest["entries"]) == len(expected)
    assert {(m["class"], m["url"].removeprefix(server.base)): m["status"] for m in manifest["entries"]} \
        == expected
    assert set(manifest["entries"][0]) >= {"class", "url", "source", "license", "status", "reason",
                                           "sha256", "path"}


def test_reasons_name_the_problem(scraped, server):
    got = by_path(scraped[0], server)
    assert "404" in got[("daisy", "/missing.jpg")].reason
    assert "500" in got[("daisy", "/error.jpg")].reason and "2 attempts" in got[("daisy", "/error.jpg")].reason
    assert "HTML" in got[("daisy", "/page.jpg")].reason
    assert "0 bytes" in got[("daisy", "/empty.jpg")].reason
    assert "SVG" in got[("daisy", "/vector.svg")].reason
    assert "200000000 pixels" in got[("daisy", "/bomb.png")].reason
    assert "horse" in got[("daisy", "/good/daisy/1.jpg")].reason
    assert "daisy" in got[("horse", "/cross.jpg")].reason
    assert got[("daisy", "/near-copy.jpg")].reason.startswith("phash distance")


def test_retries_redirects_and_query_strings(scraped):
    _, hits = scraped
    assert hits["/error.jpg"] == 2  # 500: retried once (retries=1)
    assert hits["/flaky.jpg"] == 2  # 503 then ok
    assert hits["/missing.jpg"] == 1  # 404 is not retried; the same URL in two classes is fetched once
    assert hits["/slow.jpg"] == 2  # timeout is transient
    assert hits["/loop/a"] == 1 and hits["/loop/b"] == 1  # loop detected on the first repeat
    assert hits["/target.jpg?from=moved"] == 1  # redirect followed, its query string kept
    assert hits["/select?id=1"] == 1 and hits["/select?id=2"] == 1
    assert hits["/page.jpg"] == 1 and hits["/truncated.jpg"] == 1  # permanent errors: no retry


def test_kept_files_are_normalised_rgb_jpegs_named_by_hash(scraped):
    result, _ = scraped
    kept = [e for e in result.entries if e.status == "ok"]
    for e in kept:
        f = result.dest / e.path
        data = f.read_bytes()
        assert hashlib.sha256(data).hexdigest() == e.sha256  # hash of the normalised JPEG bytes
        assert f.name == f"{e.sha256[:16]}.jpg" and f.parent.name == e.cls
        with Image.open(f) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
            assert max(im.size) <= 64 and min(im.size) >= 32 // 2  # 120x90 -> 64x48
            assert im.size == (e.width, e.height)
    files = {p.relative_to(result.dest).as_posix() for p in result.dest.rglob("*") if p.is_file()}
    assert files == {e.path for e in kept} | {"manifest.json", "scrape_config.json"}
    assert not (result.dest / ".staging").exists()


def _kept_image(result, server, cls, path):
    e = by_path(result, server)[(cls, path)]
    return Image.open(result.dest / e.path), e


def test_special_modes_are_converted_properly(scraped, server):
    result, _ = scraped
    im, e = _kept_image(result, server, "horse", "/exif.jpg")
    assert im.height > im.width and "EXIF" in e.notes  # stored landscape, shown portrait
    for cls, path in (("daisy", "/rgba.png"), ("horse", "/palette.png")):
        im, e = _kept_image(result, server, cls, path)
        left = im.crop((0, 0, im.width // 2 - 4, im.height)).convert("L")
        assert min(left.getdata()) > 240, f"{path}: transparent area must be white, not black"
    im, e = _kept_image(result, server, "horse", "/anim.gif")
    h = imagehash.phash(im)
    assert h - imagehash.phash(pattern(103)) < h - imagehash.phash(pattern(104)), "first frame kept"
    assert "first of 3 frames" in e.notes
    im, e = _kept_image(result, server, "horse", "/gray16.png")
    mean = sum(im.convert("L").getdata()) / (im.width * im.height)
    assert 30 < mean < 220, "16-bit scaled to 8-bit, not clipped to white"
    naive = Image.open(io.BytesIO(build_routes()["/gray16.png"][2])).convert("RGB").convert("L")
    assert min(naive.getdata()) == 255  # what a plain PIL convert does to it
    # pixels against independent references: the RGB image the CMYK file was made from, and the EXIF
    # image rotated 90 degrees clockwise by numpy (orientation 6), both resized like the scraper does
    im, _ = _kept_image(result, server, "daisy", "/cmyk.jpg")
    assert im.mode == "RGB" and mean_abs_diff(im, pattern(107)) < 8, "CMYK colours kept, not inverted"
    assert mean_abs_diff(im, Image.fromarray(255 - np.asarray(pattern(107)))) > 60
    im, e = _kept_image(result, server, "horse", "/exif.jpg")
    clockwise = Image.fromarray(np.rot90(np.asarray(pattern(104)), k=-1).copy())
    assert mean_abs_diff(im, clockwise) < 8 and mean_abs_diff(im, clockwise.rotate(180)) > 20


def test_split_is_seeded_and_has_no_duplicate_across_train_and_valid(scraped):
    result, _ = scraped
    for cls in ("daisy", "horse"):
        kept = result.kept(cls)
        n_valid = sum(e.split == "valid" for e in kept)
        assert n_valid == round(len(kept) * 0.2) and n_valid >= 1
        assert all((result.dest / e.split / cls).is_dir() for e in kept)
    kept = [e for e in result.entries if e.status == "ok"]
    train = [e for e in kept if e.split == "train"]
    valid = [e for e in kept if e.split == "valid"]
    assert min(phash_distance(a.phash, b.phash) for a in train for b in valid) > 6
    # same seed -> same split; another seed -> another split
    again = [replace(e) for e in kept]
    assign_split(again, 0.2, 42)
    assert [e.split for e in again] == [e.split for e in kept]
    other = [replace(e) for e in kept]
    assign_split(other, 0.2, 7)
    assert [e.split for e in other] != [e.split for e in kept]


def test_summary_table_counts_every_url(scraped):
    result, _ = scraped
    table = result.summary_table()
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    daisy = dict(zip(head, [c.strip() for c in lines[2].strip("|").split("|")]))
    assert daisy["class"] == "daisy" and daisy["found"] == str(len(EXPECTED["daisy"]))
    assert daisy["kept"] == "11" and daisy["bomb"] == "1" and daisy["not_image"] == "3"
    assert "too_large" in head and "label_conflict" in head
    assert result.short_classes == {}


def test_near_duplicate_threshold():
    """A resized + re-encoded copy is within 6 bits; different images are far beyond it."""
    for seed in range(5):
        orig = pattern(seed)
        copy = Image.open(io.BytesIO(encode(orig.resize((70, 52)), quality=50)))
        assert phash_distance(str(imagehash.phash(orig)), str(imagehash.phash(copy))) <= 6
    hashes = [str(imagehash.phash(pattern(s))) for s in range(20)]
    assert min(phash_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]) > 6


@pytest.mark.parametrize("w, h, reason", [
    (20000, 10000, "200000000 pixels"),  # over PIL's own hard limit (2 x 89 M px): refused at open
    (8000, 6000, "8000x6000 = 48000000 pixels"),  # under PIL's limit, over our 40 M px cap: our header check
])
def test_bomb_is_refused_before_decoding(tmp_path, monkeypatch, w, h, reason):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_bomb(w, h))
    assert p.stat().st_size < 30_000  # a few KB on disk, tens of millions of pixels declared
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    out = normalise_image(p, max_pixels=40_000_000)
    assert out.status == "bomb" and reason in out.reason
    assert loads == [], "no pixel was decoded"


def test_truncated_jpeg_passes_verify_but_is_rejected(tmp_path):
    data = encode(pattern(3), quality=90)
    p = tmp_path / "t.jpg"
    p.write_bytes(data[: len(data) * 2 // 3])
    with Image.open(p) as im:
        im.verify()  # what a verify()-only check would accept
    assert normalise_image(p).status == "corrupt"


def test_too_small_and_resize(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(exif_rotated_jpeg())
    out = normalise_image(p, max_size=40, min_size=10)
    assert out.status == "ok" and (out.width, out.height) == (30, 40)
    assert out.reason == "" and out.orig_size == (90, 120)  # one frame: no "first of" note
    assert out.notes == "EXIF rotation applied; resized from 90x120"
    assert out.sha256 == hashlib.sha256(out.data).hexdigest()  # the saved bytes, what the file is named by
    with Image.open(io.BytesIO(out.data)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (30, 40))
        assert phash_distance(out.phash, str(imagehash.phash(im))) <= 4  # the hash of this very image
    assert normalise_image(p, min_size=100).status == "too_small"


def test_too_small_and_resize_downscales_like_pil_lanczos_thumbnail(tmp_path):
    """Fine stripes tell the filters apart: Lanczos keeps them within JPEG noise, bicubic and box do not."""
    a = np.zeros((90, 120, 3), np.uint8)
    a[:, ::2] = 255
    stripes = Image.fromarray(a)
    out = normalise_image(save(tmp_path, encode(stripes, "PNG"), "s.png"), max_size=47, min_size=8)
    got = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"), np.int16)
    diff = {}
    for name in ("LANCZOS", "BICUBIC", "BOX"):
        ref = stripes.copy()
        ref.thumbnail((47, 47), getattr(Image.Resampling, name))
        diff[name] = float(np.abs(got - np.asarray(ref, np.int16)).mean())
    assert got.shape == (35, 47, 3) and diff["LANCZOS"] < 0.8 < diff["BICUBIC"] < diff["BOX"], diff


def test_normalise_defaults_are_the_scraper_defaults(tmp_path):
    """A direct call gets the limits `scripts/scrape.py` uses: 512 px longest side, 64 px shortest, 40 M px."""
    cfg, sig = ScrapeConfig(classes=["a"]), inspect.signature(normalise_image).parameters
    assert {k: sig[k].default for k in ("max_size", "min_size", "max_pixels")} == \
        {"max_size": cfg.max_size, "min_size": cfg.min_size, "max_pixels": cfg.max_pixels} == \
        {"max_size": 512, "min_size": 64, "max_pixels": 40_000_000}
    over = normalise_image(save(tmp_path, png_bomb(754717, 53), "over.png"))  # 40_000_001 px: one too many
    assert over.status == "bomb" and "40000001 pixels" in over.reason
    for (w, h), want in (((512, 64), (512, 64)), ((513, 64), (512, 64)), ((600, 63), None)):
        out = normalise_image(save(tmp_path, encode(pattern(1, size=(w, h)), "PNG"), f"{w}x{h}.png"))
        assert (out.width, out.height) == want if want else out.status == "too_small", (w, h, out)


def test_16bit_png_is_scaled_to_8bit_not_clipped(tmp_path):
    data = build_routes()["/gray16.png"][2]
    with Image.open(io.BytesIO(data)) as src:
        assert src.mode.startswith("I")  # PIL opens it as 32-bit integer samples
        want = np.asarray(src, np.float64) / 257  # 65535 -> 255, the independent reference
    out = normalise_image(save(tmp_path, data, "g.png"), max_size=200, min_size=8)
    assert out.status == "ok" and "16-bit->8-bit" in out.notes.split("; ")
    got = np.asarray(Image.open(io.BytesIO(out.data)).convert("L"), np.float64)
    assert got.shape == want.shape and np.abs(got - want).mean() < 3


class FlakyBackend:
    """Fails `fails` times with ddgs's generic exception (how it reports rate limits), then answers."""

    name = "fake"

    def __init__(self, results: dict, fails: int):
        self.results, self.fails, self.calls = results, fails, []

    def search(self, query, max_results, **filters):
        from ddgs.exceptions import DDGSException
        self.calls.append((query, max_results, filters))
        if self.fails > 0 or query not in self.results:
            self.fails -= 1
            raise DDGSException("202 Ratelimit")
        return [SearchHit(u, source="http://page.example/" + query) for u in self.results[query]]


def test_search_retries_with_backoff_then_records_outcome():
    be = FlakyBackend({"daisy photo": ["u1", "u2", "u3"]}, fails=2)
    sleeps = Sleeps()
    hits, out = search_with_retry(be, "daisy", "daisy photo", 2, retries=4, backoff=1.5, sleep=sleeps,
                                  type_image="photo")
    assert [h.url for h in hits] == ["u1", "u2"]
    assert (out.status, out.attempts, out.n_hits) == ("ok", 3, 2)
    assert sleeps == [1.5, 3.0]  # exponential backoff
    assert be.calls[0] == ("daisy photo", 2, {"type_image": "photo"})
    hits, out = search_with_retry(be, "mango", "mango", 5, retries=2, sleep=sleeps)
    assert hits == [] and out.status == "failed" and out.attempts == 3 and "Ratelimit" in out.error


def test_failing_query_does_not_stop_the_others(server, tmp_path):
    good = [server.url(f"/good/horse/{i}.jpg") for i in range(4)]
    be = FlakyBackend({"horse photo": good}, fails=1)
    cfg = small_cfg(tmp_path / "d", classes=["horse", "mango"], query_suffix="photo", search_retries=2,
                    n_images=10)
    result = scrape_dataset(cfg, backend=be, sleep=Sleeps())
    q = {o["cls"]: o for o in result.queries}
    assert q["horse"]["status"] == "ok" and q["horse"]["attempts"] == 2
    assert q["mango"]["status"] == "failed" and q["mango"]["attempts"] == 3
    assert len(result.kept("horse")) == 4 and result.short_classes == {"mango": 0}
    assert all(e.source == "http://page.example/horse photo" for e in result.entries)
    assert "failed" in result.summary_table()
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert [o["status"] for o in manifest["queries"]] == ["ok", "failed"]


def test_ddgs_backend_maps_results_and_filters(monkeypatch):
    calls = []

    class FakeDDGS:
        def __init__(self, timeout=None):
            pass

        def images(self, query, **kw):
            calls.append((query, kw))
            return [{"image": "http://x/1.jpg", "url": "http://page/1", "title": "t", "thumbnail": "th"},
                    {"image": "", "url": "http://page/2"}]

    be = DDGSBackend()
    be.ddgs_cls = FakeDDGS
    hits = be.search("daisy", 5, type_image="photo", size="Medium", license_image=None)
    assert hits == [SearchHit("http://x/1.jpg", "http://page/1", "t", "")]
    assert calls[0][0] == "daisy"
    assert calls[0][1]["max_results"] == 5 and calls[0][1]["type_image"] == "photo"
    assert calls[0][1]["size"] == "Medium" and "license_image" not in calls[0][1]
    with pytest.raises(ValueError, match="colour"):
        be.search("daisy", 5, colour="red")


def test_resume_downloads_nothing_new(server, tmp_path):
    spec = {"daisy": [f"/good/daisy/{i}.jpg" for i in range(2, 6)] + ["/missing.jpg", "/error.jpg",
                                                                        "/page.jpg", "/dup-copy.jpg"],
            "horse": [f"/good/horse/{i}.jpg" for i in range(4)] + ["/cross.jpg", "/tiny.png"]}
    urls = write_urls(tmp_path / "u.json", server, spec)
    cfg = small_cfg(tmp_path / "d", from_urls=urls)
    first = scrape_dataset(cfg, sleep=Sleeps())
    files = sorted(p for p in cfg.dest.rglob("*.jpg"))
    before = server.hits.copy()
    second = scrape_dataset(cfg, sleep=Sleeps())
    new_hits = server.hits - before
    assert set(new_hits) == {"/error.jpg"}, "only the transient 500 is tried again"
    assert second.n_fetched == 1
    assert [(e.url, e.status, e.path) for e in second.entries] == \
        [(e.url, e.status, e.path) for e in first.entries]
    assert sorted(p for p in cfg.dest.rglob("*.jpg")) == files


def test_resume_refetches_deleted_file_and_reprocesses_on_new_settings(server, tmp_path):
    urls = write_urls(tmp_path / "u.json", server, {"horse": [f"/good/horse/{i}.jpg" for i in range(3)]})
    cfg = small_cfg(tmp_path / "d", from_urls=urls)
    first = scrape_dataset(cfg, sleep=Sleeps())
    (cfg.dest / first.entries[0].path).unlink()
    assert scrape_dataset(cfg, sleep=Sleeps()).n_fetched == 1
    bigger = scrape_dataset(replace(cfg, max_size=100), sleep=Sleeps())
    assert bigger.n_fetched == 3  # size changed: images re-made, old files replaced
    sizes = {Image.open(p).size for p in cfg.dest.rglob("*.jpg")}
    assert sizes == {(100, 75)} and len(list(cfg.dest.rglob("*.jpg"))) == 3


def test_rerun_keeps_earlier_search_hits_but_follows_an_edited_url_list(server, tmp_path):
    good = [server.url(f"/good/horse/{i}.jpg") for i in range(5)]
    cfg = small_cfg(tmp_path / "s", classes=["horse"], type_image=None)
    scrape_dataset(cfg, backend=StaticBackend({"horse": good[:3]}), sleep=Sleeps())
    again = scrape_dataset(cfg, backend=StaticBackend({"horse": good[2:]}), sleep=Sleeps())
    assert again.n_fetched == 2 and len(again.kept("horse")) == 5  # search results vary: keep the union
    urls = write_urls(tmp_path / "u.json", server, {"horse": [f"/good/horse/{i}.jpg" for i in range(3)]})
    cfg = small_cfg(tmp_path / "l", from_urls=urls)
    scrape_dataset(cfg, sleep=Sleeps())
    write_urls(urls, server, {"horse": ["/good/horse/0.jpg", "/good/horse/1.jpg"]})
    edited = scrape_dataset(cfg, sleep=Sleeps())
    assert edited.n_fetched == 0 and len(edited.entries) == 2
    assert len(list(cfg.dest.rglob("*.jpg"))) == 2  # the file of the removed URL is gone


def test_duplicate_becomes_kept_when_its_original_leaves_the_list(server, tmp_path):
    urls = write_urls(tmp_path / "u.json", server, {"daisy": ["/good/daisy/0.jpg", "/dup-copy.jpg"]})
    cfg = small_cfg(tmp_path / "d", from_urls=urls)
    assert [e.status for e in scrape_dataset(cfg, sleep=Sleeps()).entries] == ["ok", "duplicate"]
    write_urls(urls, server, {"daisy": ["/dup-copy.jpg"]})
    after = scrape_dataset(cfg, sleep=Sleeps())
    assert [e.status for e in after.entries] == ["ok"] and after.n_fetched == 1  # its file was never kept
    assert (cfg.dest / after.entries[0].path).is_file() and len(list(cfg.dest.rglob("*.jpg"))) == 1


def test_interrupted_download_leaves_no_partial_file(server, tmp_path, monkeypatch):
    urls = write_urls(tmp_path / "u.json", server, {"horse": [f"/good/horse/{i}.jpg" for i in range(4)]})
    cfg = small_cfg(tmp_path / "d", from_urls=urls, workers=1)
    real = scrape_fetch._read_chunks
    parts = []

    def interrupted(resp):
        for chunk in real(resp):
            parts.extend(tmp_path.rglob("*.part"))  # the temp file exists while downloading
            yield chunk[:100]
            raise KeyboardInterrupt  # Ctrl-C midway through the body

    monkeypatch.setattr(scrape_fetch, "_read_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scrape_dataset(cfg, sleep=Sleeps())
    assert parts, "download went through a temporary file"
    assert [p for p in cfg.dest.rglob("*") if p.is_file()] == []  # no partial image, no manifest
    monkeypatch.setattr(scrape_fetch, "_read_chunks", real)
    assert len(scrape_dataset(cfg, sleep=Sleeps()).kept("horse")) == 4


def test_fetch_url_removes_its_temp_file_when_interrupted(server, tmp_path, monkeypatch):
    def interrupted(resp):
        yield resp.read(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(scrape_fetch, "_read_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scrape_fetch.fetch_url(server.url("/good/horse/0.jpg"), tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    ok = scrape_fetch.fetch_url(server.url("/good/horse/0.jpg"), tmp_path)
    assert ok.status == "ok" and list(tmp_path.iterdir()) == [ok.path] and ok.fmt == "JPEG"
    assert scrape_fetch.fetch_url("ftp://x/a.jpg", tmp_path).status == "bad_url"


def test_read_url_list_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"daisy": ["http://x/1.jpg", {"url": "http://x/2.jpg",
                                                                             "license": "cc-by"}]}))
    (tmp_path / "b.csv").write_text("class,url,source,license\ndaisy,http://x/1.jpg,,\n"
                                    "daisy,http://x/2.jpg,,cc-by\n")
    (tmp_path / "c.csv").write_text("daisy,http://x/1.jpg\ndaisy,http://x/2.jpg,,cc-by\n")
    manifest = {"entries": [UrlEntry("daisy", "http://x/1.jpg").to_dict(),
                            UrlEntry("daisy", "http://x/2.jpg", license="cc-by").to_dict()]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    want = {"daisy": [SearchHit("http://x/1.jpg"), SearchHit("http://x/2.jpg", license="cc-by")]}
    for name in ("a.json", "b.csv", "c.csv", "manifest.json"):
        assert read_url_list(tmp_path / name) == want, name
    (tmp_path / "bad.csv").write_text("daisy\n")
    with pytest.raises(ValueError, match="row 1"):
        read_url_list(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text('["http://x"]')
    with pytest.raises(ValueError, match="expected"):
        read_url_list(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_url_list(tmp_path / "nope.json")


@pytest.mark.parametrize("kw, match", [
    ({"classes": []}, "no classes"),
    ({"valid_pct": 1.0}, "--valid-pct"),
    ({"max_size": 10, "min_size": 20}, "--max-size"),
    ({"near_dup_bits": 65}, "--near-dup-bits"),
    ({"classes": ["grizzly bear", "grizzly_bear"]}, "same folder"),
    ({"classes": ["!!"]}, "no usable characters"),
])
def test_bad_config_is_named(tmp_path, kw, match):
    cfg = ScrapeConfig(**{"classes": ["a"], "dest": tmp_path, **kw})
    with pytest.raises(ValueError, match=match):
        scrape_dataset(cfg, backend=FlakyBackend({}, 0))


def test_class_folder_names():
    assert class_folder(" grizzly bear ") == "grizzly_bear"
    assert class_folder("black/white cat?") == "black_white_cat"


def test_cli_exits_non_zero_naming_the_short_class(server, tmp_path, monkeypatch, capsys):
    spec = {"daisy": [f"/good/daisy/{i}.jpg" for i in range(2, 7)], "horse": ["/good/horse/0.jpg"]}
    urls = write_urls(tmp_path / "u.json", server, spec)
    dest = tmp_path / "d"
    # the real script, run in-process (a subprocess would spend its time importing fastai)
    monkeypatch.setattr(sys, "argv", ["scrape.py", "--from-urls", str(urls), "--dest", str(dest),
                                      "--min-per-class", "3", "--max-size", "64", "--min-size", "32",
                                      "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "scrape.py"), run_name="__main__")
    out = capsys.readouterr()
    assert exit_.value.code == 1
    assert "'horse' has 1" in out.err and "daisy" not in out.err
    assert "| daisy | 5 | 5 | 4 | 1 |" in out.out
    assert len(list((dest / "train" / "daisy").glob("*.jpg"))) == 4
    config = json.loads((dest / "scrape_config.json").read_text())
    assert config["min_per_class"] == 3 and config["max_size"] == 64 and config["type_image"] == "photo"


@pytest.mark.skipif(not (REPO / "scripts" / "recipe.py").exists(), reason="scripts/recipe.py not written yet")
def test_recipe_smoke_trains_on_scraped_data(scraped, tmp_path):
    result, _ = scraped
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe.py"), "--smoke",
                           "--data", str(result.dest), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    made = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert made & {".pkl", ".pth", ".pt", ".safetensors", ".json", ".md", ".html"}, made



# ---------------------------------------------------------------- pixels, formats, limits, resume

def mean_abs_diff(im: Image.Image, ref: Image.Image) -> float:
    """Mean absolute RGB difference (0-255) between `im` and `ref` resized to im's size."""
    ref = ref.convert("RGB").resize(im.size, Image.Resampling.BILINEAR)
    return float(np.abs(np.asarray(im.convert("RGB"), np.int16) - np.asarray(ref, np.int16)).mean())


# pure CMYK inks (0-255 each) and the RGB a print of them shows: R = 255 - C - K, G = 255 - M - K, ...
CMYK_BLOCKS = [((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)),
               ((0, 0, 255, 0), (255, 255, 0)), ((0, 0, 0, 255), (0, 0, 0)),
               ((0, 0, 0, 0), (255, 255, 255)), ((0, 255, 255, 0), (255, 0, 0))]
BLOCK = 32  # px, side of each colour block (a multiple of JPEG's 16 px MCU: flat blocks decode flat)


def block_image(colours, mode: str, per_row: int = 3) -> Image.Image:
    """Blocks of flat colour, row by row, `per_row` to a row."""
    rows = -(-len(colours) // per_row)
    im = Image.new(mode, (per_row * BLOCK, rows * BLOCK))
    for i, c in enumerate(colours):
        x, y = (i % per_row) * BLOCK, (i // per_row) * BLOCK
        im.paste(c, (x, y, x + BLOCK, y + BLOCK))
    return im


def block_centres(im: Image.Image, n: int, per_row: int = 3) -> list[tuple[int, ...]]:
    return [im.getpixel(((i % per_row) * BLOCK + BLOCK // 2, (i // per_row) * BLOCK + BLOCK // 2))
            for i in range(n)]


def close_colours(got, want, tol=12) -> bool:
    return all(abs(a - b) <= tol for g, w in zip(got, want) for a, b in zip(g, w))


def save(tmp_path, data: bytes, name="x.img") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_cmyk_jpeg_gives_the_colours_of_its_inks(tmp_path):
    """Pillow stores CMYK JPEGs the Adobe way (inverted, APP14 marker), as Photoshop does."""
    data = encode(block_image([c for c, _ in CMYK_BLOCKS], "CMYK"), quality=95)
    assert b"Adobe" in data[:200]
    out = normalise_image(save(tmp_path, data), min_size=8)
    assert out.status == "ok" and "CMYK->RGB" in out.notes
    with Image.open(io.BytesIO(out.data)) as im:
        got = block_centres(im, len(CMYK_BLOCKS))
    assert close_colours(got, [rgb for _, rgb in CMYK_BLOCKS]), got


RED, GREEN, GREY = (230, 20, 20), (20, 200, 20), (128, 128, 128)
# EXIF orientation -> display corners of the stored top-left (red) and top-right (green) marks.
# 2: mirrored left-right, 3: turned 180, 4: mirrored top-bottom, 5: transposed, 6: turned 90 clockwise,
# 7: transversed, 8: turned 90 anticlockwise (EXIF 2.3, tag 0x0112)
ORIENTED = {1: ("tl", "tr"), 2: ("tr", "tl"), 3: ("br", "bl"), 4: ("bl", "br"),
            5: ("tl", "bl"), 6: ("tr", "br"), 7: ("br", "tr"), 8: ("bl", "tl")}


def marked_jpeg(orientation: int, w=96, h=64, mark=24) -> bytes:
    """Grey, stored w x h, red mark at the stored top-left, green at the stored top-right."""
    a = np.full((h, w, 3), GREY, np.uint8)
    a[:mark, :mark], a[:mark, -mark:] = RED, GREEN
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def corner(im: Image.Image, name: str, inset=8) -> tuple[int, ...]:
    x = inset if name[1] == "l" else im.width - 1 - inset
    y = inset if name[0] == "t" else im.height - 1 - inset
    return im.getpixel((x, y))


@pytest.mark.parametrize("orientation", list(ORIENTED))
def test_exif_orientation_puts_pixels_where_a_viewer_shows_them(tmp_path, orientation):
    out = normalise_image(save(tmp_path, marked_jpeg(orientation), "o.jpg"), min_size=8)
    assert out.status == "ok"
    turned = orientation >= 5
    assert (out.width, out.height) == ((64, 96) if turned else (96, 64)) and out.orig_size == (out.width, out.height)
    assert ("EXIF rotation applied" in out.notes) == (orientation != 1)
    with Image.open(io.BytesIO(out.data)) as im:
        assert im.getexif().get(0x0112, 1) == 1, "rotated pixels must not carry the rotation tag again"
        red, green = ORIENTED[orientation]
        corners = {c: corner(im, c) for c in ("tl", "tr", "bl", "br")}
    want = {c: RED if c == red else GREEN if c == green else GREY for c in corners}
    assert close_colours([corners[c] for c in corners], [want[c] for c in corners], tol=30), corners


def big_endian_tiff(a: np.ndarray) -> bytes:
    """An uncompressed 8-bit greyscale TIFF in Motorola byte order ('MM\\0*'), written by hand."""
    h, w = a.shape
    tags = [(256, w), (257, h), (258, 8), (259, 1), (262, 1), (273, None), (277, 1), (278, h), (279, w * h)]
    data_at = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack(">H", len(tags))
    for tag, value in tags:  # all SHORT (3) except the strip offset and byte count, LONG (4)
        if tag in (273, 279):
            ifd += struct.pack(">HHII", tag, 4, 1, data_at if value is None else value)
        else:
            ifd += struct.pack(">HHIHH", tag, 3, 1, value, 0)
    return b"MM\x00*" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0) + a.astype(np.uint8).tobytes()


FORMAT_COLOURS = [RED, GREEN, (20, 20, 220), (250, 250, 250)]
GREY_LEVELS = [(30,) * 3, (90,) * 3, (160,) * 3, (230,) * 3]


def format_files() -> dict[str, tuple[str, bytes, list]]:
    """name -> (format its first bytes name, bytes, block colours), each under a misleading name."""
    rgb = block_image(FORMAT_COLOURS, "RGB", per_row=2)
    grey = block_image([g[:1] for g in GREY_LEVELS], "L", per_row=2)
    return {
        "/fmt/webp.jpg": ("WEBP", encode(rgb, "WEBP", lossless=True), FORMAT_COLOURS),
        "/fmt/bmp.png": ("BMP", encode(rgb, "BMP"), FORMAT_COLOURS),
        "/fmt/tiff-le.jpg": ("TIFF", encode(rgb, "TIFF"), FORMAT_COLOURS),
        "/fmt/tiff-be.gif": ("TIFF", big_endian_tiff(np.asarray(grey)), GREY_LEVELS),
        "/fmt/gif87.jpg": ("GIF", b"GIF87a" + encode(rgb, "GIF")[6:], FORMAT_COLOURS),
        "/fmt/png.jpg": ("PNG", encode(rgb, "PNG"), FORMAT_COLOURS),
    }


def format_routes() -> dict:
    """The format files, served as text/html: only their first bytes say what they are."""
    return {path: (200, {"Content-Type": "text/html"}, data) for path, (_, data, _) in format_files().items()}


@pytest.mark.parametrize("path", list(format_files()))
def test_format_comes_from_the_first_bytes_and_decodes_to_its_pixels(server, tmp_path, path):
    fmt, data, colours = format_files()[path]
    assert scrape_fetch.sniff_format(data[:16]) == fmt
    r = scrape_fetch.fetch_url(server.url(path), tmp_path)
    assert (r.status, r.fmt) == ("ok", fmt) and r.path.read_bytes() == data
    out = normalise_image(r.path, min_size=8)
    assert out.status == "ok"
    if colours is not None:
        with Image.open(io.BytesIO(out.data)) as im:
            assert close_colours(block_centres(im, 4, per_row=2), colours), path


@pytest.mark.parametrize("head", [b"RIFF\x24\x00\x00\x00WAVEfmt ", b"RIFF", b"II*", b"MM\x00+\x00\x08",
                                  b"GIF88a", b"\x89PNG\r\n", b"\xff\xd8", b"", b"<html><body>"])
def test_near_miss_signatures_are_not_images(head):
    assert scrape_fetch.sniff_format(head) is None


@pytest.mark.parametrize("n", [2, 3])
def test_animated_gif_keeps_its_first_frame(tmp_path, n):
    frames = [Image.new("RGB", (64, 64), c) for c in (RED, GREEN, (20, 20, 220))[:n]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = normalise_image(save(tmp_path, data, "a.gif"), min_size=8)
    assert out.status == "ok" and out.notes == f"first of {n} frames; palette->RGB"
    with Image.open(io.BytesIO(out.data)) as im:
        assert close_colours([im.getpixel((32, 32))], [RED])


def test_jpeg_quality_reaches_the_saved_file(tmp_path):
    p = save(tmp_path, encode(pattern(6), "PNG"), "q.png")
    sizes = [len(normalise_image(p, min_size=8, quality=q).data) for q in (50, 90)]
    assert sizes[1] > sizes[0] * 1.3, sizes  # quality 90 (the scraper's) keeps far more detail than 50


def test_unidentifiable_bytes_are_not_images(tmp_path):
    out = normalise_image(save(tmp_path, b"plain text, not an image\n" * 20))
    assert out.status == "not_image" and out.reason.startswith("PIL cannot identify it") and not out.data


def test_bmp_signature_with_garbage_is_rejected_not_crashed(tmp_path):
    out = normalise_image(save(tmp_path, b"BM" + b"\x00junk" * 40))
    assert out.status in ("not_image", "corrupt") and out.reason and not out.data


def test_pixel_cap_and_size_limits_are_inclusive_bounds(tmp_path):
    p = save(tmp_path, encode(pattern(5, size=(80, 60)), "PNG"), "p.png")
    assert normalise_image(p, max_pixels=80 * 60, min_size=8).status == "ok"  # exactly at the cap
    assert normalise_image(p, max_pixels=80 * 60 - 1, min_size=8).status == "bomb"
    assert normalise_image(p, min_size=60).status == "ok"  # shorter side exactly min_size
    assert normalise_image(p, min_size=61).status == "too_small"
    at = normalise_image(p, max_size=80, min_size=8)
    assert (at.width, at.height) == (80, 60) and at.notes == ""  # one frame, no EXIF, no resize
    down = normalise_image(p, max_size=79, min_size=8)
    assert (down.width, down.height) == (79, 59) and "resized from 80x60" in down.notes
    assert down.orig_size == (80, 60)
    small = normalise_image(p, min_size=100)
    assert small.orig_size == (80, 60) and "80x60" in small.reason


def test_palette_without_transparency_keeps_its_colours():
    im = block_image(FORMAT_COLOURS, "RGB", per_row=2).quantize(8)
    notes = []
    out = to_rgb(im, notes)
    assert out.mode == "RGB" and notes == ["palette->RGB"]
    assert close_colours(block_centres(out, 4, per_row=2), FORMAT_COLOURS, tol=4)


def test_phash_distance_counts_differing_bits():
    assert phash_distance("0" * 16, "0" * 16) == 0
    assert phash_distance("0" * 15 + "1", "0" * 16) == 1
    assert phash_distance("ffff000000000000", "0000000000000000") == 16
    assert phash_distance("f" * 16, "0" * 16) == 64
    assert phash_distance("a" * 16, "5" * 16) == 64  # 1010 vs 0101 in every digit


class FakeClock:
    """Stands in for scrape_fetch's `time`: each monotonic() reading is `step` s after the last one."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def test_max_seconds_stops_a_download_that_trickles_on(server, tmp_path, monkeypatch):
    """Every read arrives within --timeout, but the whole body takes longer than --max-seconds."""
    monkeypatch.setattr(scrape_fetch, "CHUNK", 512)  # a ~4.5 KB image arrives in ~9 reads
    monkeypatch.setattr(scrape_fetch, "time", SimpleNamespace(monotonic=FakeClock(1.0).monotonic))
    url = server.url("/good/daisy/2.jpg")
    sleeps = Sleeps()
    r = scrape_fetch.fetch_url(url, tmp_path, max_seconds=3.5, retries=1, backoff=0.25, sleep=sleeps)
    assert (r.status, r.attempts) == ("timeout", 2) and "took over 3.5 s" in r.reason
    assert sleeps == [0.25] and list(tmp_path.iterdir()) == []  # transient: retried; no partial file
    body = build_routes()["/good/daisy/2.jpg"][2]
    assert len(body) > 6 * 512
    ok = scrape_fetch.fetch_url(url, tmp_path, max_seconds=1000, sleep=sleeps)
    assert ok.status == "ok" and ok.path.read_bytes() == body


def test_max_seconds_reaches_the_download_from_the_config(server, tmp_path, monkeypatch):
    monkeypatch.setattr(scrape_fetch, "CHUNK", 512)
    monkeypatch.setattr(scrape_fetch, "time", SimpleNamespace(monotonic=FakeClock(1.0).monotonic))
    urls = write_urls(tmp_path / "u.json", server, {"horse": ["/good/horse/2.jpg"]})
    result = scrape_dataset(small_cfg(tmp_path / "d", from_urls=urls, max_seconds=3, min_per_class=0),
                            sleep=Sleeps())
    assert [(e.status, "took over 3 s" in e.reason) for e in result.entries] == [("timeout", True)]


def refused_url() -> str:
    """A loopback URL nothing listens on (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.jpg"


def test_network_errors_are_transient_and_retried(server, tmp_path, monkeypatch):
    sleeps = Sleeps()
    r = scrape_fetch.fetch_url(refused_url(), tmp_path, retries=2, backoff=0.5, sleep=sleeps)
    assert (r.status, r.attempts) == ("network_error", 3) and "refused" in r.reason.lower()
    assert "after 3 attempts" in r.reason and sleeps == [0.5, 1.0]  # exponential backoff

    def reset_midway(resp):
        yield resp.read(100)
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(scrape_fetch, "_read_chunks", reset_midway)
    r = scrape_fetch.fetch_url(server.url("/good/daisy/3.jpg"), tmp_path, retries=1, sleep=sleeps)
    assert (r.status, r.attempts) == ("network_error", 2) and "ConnectionResetError" in r.reason
    assert list(tmp_path.iterdir()) == []


def test_resume_retries_a_network_error_and_keeps_the_rest(server, tmp_path, monkeypatch):
    spec = {"daisy": ["/good/daisy/2.jpg", "/good/daisy/3.jpg", "/good/daisy/4.jpg"]}
    urls = write_urls(tmp_path / "u.json", server, spec)
    cfg = small_cfg(tmp_path / "d", from_urls=urls, min_per_class=0)
    real = scrape_fetch._read_chunks

    def reset_one(resp):
        if resp.url.endswith("/3.jpg"):
            raise ConnectionResetError(104, "Connection reset by peer")
        yield from real(resp)

    monkeypatch.setattr(scrape_fetch, "_read_chunks", reset_one)
    first = scrape_dataset(cfg, sleep=Sleeps())
    assert [e.status for e in first.entries] == ["ok", "network_error", "ok"]
    monkeypatch.setattr(scrape_fetch, "_read_chunks", real)
    before = server.hits.copy()
    second = scrape_dataset(cfg, sleep=Sleeps())
    assert dict(server.hits - before) == {"/good/daisy/3.jpg": 1} and second.n_fetched == 1
    assert [e.status for e in second.entries] == ["ok", "ok", "ok"]
    assert [e.path for e in second.entries][::2] == [e.path for e in first.entries][::2]


def test_resume_retries_a_timed_out_url_with_a_longer_timeout(server, tmp_path):
    spec = {"horse": ["/good/horse/3.jpg", "/slow.jpg", "/good/horse/4.jpg"]}
    urls = write_urls(tmp_path / "u.json", server, spec)
    cfg = small_cfg(tmp_path / "d", from_urls=urls, retries=0, min_per_class=0)
    first = scrape_dataset(cfg, sleep=Sleeps())
    assert [e.status for e in first.entries] == ["ok", "timeout", "ok"]
    before = server.hits.copy()
    second = scrape_dataset(replace(cfg, timeout=10.0), sleep=Sleeps())  # timeout is no image setting
    assert dict(server.hits - before) == {"/slow.jpg": 1} and second.n_fetched == 1
    assert [e.status for e in second.entries] == ["ok", "ok", "ok"]
    assert (cfg.dest / second.entries[1].path).is_file()


@pytest.mark.parametrize("change, status", [
    (dict(min_size=100), "too_small"),  # the good images are 120x90
    (dict(max_pixels=120 * 90 - 1), "bomb"),
    (dict(max_bytes=2_000), "too_large"),  # the good images are ~4.5 KB
])
def test_each_image_setting_reprocesses_on_resume(server, tmp_path, change, status):
    good = [f"/good/horse/{i}.jpg" for i in range(3)]
    urls = write_urls(tmp_path / "u.json", server, {"horse": good + ["/tiny.png"]})
    cfg = small_cfg(tmp_path / "d", from_urls=urls, max_size=128, min_per_class=0)
    assert [e.status for e in scrape_dataset(cfg, sleep=Sleeps()).entries] == ["ok"] * 3 + ["too_small"]
    strict = scrape_dataset(replace(cfg, **change), sleep=Sleeps())
    assert strict.n_fetched == 4 and [e.status for e in strict.entries][:3] == [status] * 3
    assert list(cfg.dest.rglob("*.jpg")) == []  # images no longer kept are removed
    back = scrape_dataset(cfg, sleep=Sleeps())  # the earlier settings again: processed again
    assert back.n_fetched == 4 and [e.status for e in back.entries] == ["ok"] * 3 + ["too_small"]


def test_a_lower_min_size_rescues_an_image_rejected_as_too_small(server, tmp_path):
    urls = write_urls(tmp_path / "u.json", server, {"horse": ["/tiny.png", "/good/horse/5.jpg"]})
    cfg = small_cfg(tmp_path / "d", from_urls=urls, min_per_class=0)
    assert [e.status for e in scrape_dataset(cfg, sleep=Sleeps()).entries] == ["too_small", "ok"]
    relaxed = scrape_dataset(replace(cfg, min_size=16), sleep=Sleeps())
    assert [e.status for e in relaxed.entries] == ["ok", "ok"] and relaxed.entries[0].width == 20


@pytest.mark.parametrize("change", [dict(timeout=3.0), dict(workers=1), dict(valid_pct=0.5), dict(seed=1),
                                    dict(retries=0), dict(max_seconds=30.0), dict(near_dup_bits=2)])
def test_settings_that_do_not_change_images_reuse_the_downloads(server, tmp_path, change):
    urls = write_urls(tmp_path / "u.json", server, {"horse": [f"/good/horse/{i}.jpg" for i in range(3)]})
    cfg = small_cfg(tmp_path / "d", from_urls=urls, min_per_class=0)
    first = scrape_dataset(cfg, sleep=Sleeps())
    again = scrape_dataset(replace(cfg, **change), sleep=Sleeps())
    assert again.n_fetched == 0 and [e.sha256 for e in again.entries] == [e.sha256 for e in first.entries]


# ---------------------------------------------------------------- fetch_url's limits, one branch at a time

JPEG_BODY = encode(pattern(300), quality=90)


def padded(n: int) -> bytes:
    """A JPEG signature padded with zeros to exactly `n` bytes (fetch_url checks only the first bytes)."""
    return b"\xff\xd8\xff\xe0" + b"\0" * (n - 4)


@pytest.fixture(scope="module")
def fetch_server():
    routes = {f"/chain/{i}": (302, {"Location": f"/chain/{i + 1}"}, b"") for i in range(6)}
    routes.update({
        "/chain/6": (200, {}, JPEG_BODY),
        "/rel/a/b": (302, {"Location": "../img.jpg?q=1"}, b""),  # relative to the redirecting URL
        "/rel/img.jpg": (200, {}, JPEG_BODY),
        "/no-location": (302, {}, b""),
        "/partial.jpg": (206, {}, JPEG_BODY),
        "/busy.jpg": (429, {}, b"slow down"),
        "/gone.jpg": (410, {}, b"gone"),
        "/at-cap.jpg": (200, {}, padded(1000)),
        "/over-cap.jpg": (200, {}, padded(1001)),
        "/declared-at-cap.jpg": (200, {"Content-Length": "1000"}, padded(1000)),
        "/declared-over-cap.jpg": (200, {"Content-Length": "1001"}, padded(1000)),
        "/streamed-at-cap.jpg": lambda q, n: (200, {}, iter([padded(600), b"\0" * 400])),
        "/streamed-over-cap.jpg": lambda q, n: (200, {}, iter([padded(600), b"\0" * 401])),
    })
    with LoopbackServer(routes) as s:
        yield s


def test_redirects_are_followed_up_to_the_limit(fetch_server, tmp_path):
    assert scrape_fetch.MAX_REDIRECTS == 5
    ok = scrape_fetch.fetch_url(fetch_server.url("/chain/1"), tmp_path)  # 5 redirects: followed
    assert (ok.status, ok.final_url, ok.http_status) == ("ok", fetch_server.url("/chain/6"), 200)
    assert ok.path.read_bytes() == JPEG_BODY and ok.attempts == 1
    over = scrape_fetch.fetch_url(fetch_server.url("/chain/0"), tmp_path, sleep=Sleeps())  # 6: refused
    assert (over.status, over.attempts) == ("redirect_loop", 1) and "more than 5 redirects" in over.reason
    assert fetch_server.hits["/chain/6"] == 1  # the sixth hop was never requested
    rel = scrape_fetch.fetch_url(fetch_server.url("/rel/a/b"), tmp_path)
    assert (rel.status, rel.final_url) == ("ok", fetch_server.url("/rel/img.jpg?q=1"))


def test_redirect_without_location_is_an_http_error(fetch_server, tmp_path):
    sleeps = Sleeps()
    r = scrape_fetch.fetch_url(fetch_server.url("/no-location"), tmp_path, retries=2, sleep=sleeps)
    assert (r.status, r.http_status, r.attempts) == ("http_error", 302, 1) and "Location" in r.reason
    assert sleeps == [] and r.path is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path, http_status, transient", [("/busy.jpg", 429, True), ("/gone.jpg", 410, False),
                                                         ("/partial.jpg", 206, False)])
def test_http_errors_are_retried_only_when_transient(fetch_server, tmp_path, path, http_status, transient):
    sleeps = Sleeps()
    before = fetch_server.hits[path]
    r = scrape_fetch.fetch_url(fetch_server.url(path), tmp_path, retries=2, backoff=0.5, sleep=sleeps)
    attempts = 3 if transient else 1
    assert (r.status, r.http_status, r.attempts) == ("http_error", http_status, attempts)
    assert fetch_server.hits[path] - before == attempts and sleeps == ([0.5, 1.0] if transient else [])
    assert str(http_status) in r.reason and ("after 3 attempts" in r.reason) == transient
    assert r.path is None and r.final_url == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path, status", [
    ("/at-cap.jpg", "ok"), ("/over-cap.jpg", "too_large"),  # Content-Length from the body
    ("/declared-at-cap.jpg", "ok"), ("/declared-over-cap.jpg", "too_large"),  # a declared length decides first
    ("/streamed-at-cap.jpg", "ok"), ("/streamed-over-cap.jpg", "too_large"),  # no length: counted as it comes
])
def test_max_bytes_is_an_inclusive_cap(fetch_server, tmp_path, path, status):
    r = scrape_fetch.fetch_url(fetch_server.url(path), tmp_path, max_bytes=1000, sleep=Sleeps())
    assert (r.status, r.attempts) == (status, 1)
    if status == "ok":
        assert r.fmt == "JPEG" and r.path.stat().st_size == 1000
    else:
        assert "1000" in r.reason and list(tmp_path.iterdir()) == []


def test_a_connect_timeout_and_a_stalled_body_are_timeouts(server, tmp_path, monkeypatch):
    def no_answer(req, timeout):
        raise urllib.error.URLError(TimeoutError("timed out"))  # how urllib reports a connect timeout

    with monkeypatch.context() as m:
        m.setattr(scrape_fetch._OPENER, "open", no_answer)
        r = scrape_fetch.fetch_url(server.url("/good/horse/0.jpg"), tmp_path, timeout=2.5, retries=1,
                                   sleep=Sleeps())
    assert (r.status, r.attempts) == ("timeout", 2) and "2.5 s" in r.reason

    def stalls(resp):
        yield resp.read(100)
        raise TimeoutError("timed out")

    monkeypatch.setattr(scrape_fetch, "_read_chunks", stalls)
    r = scrape_fetch.fetch_url(server.url("/good/horse/0.jpg"), tmp_path, timeout=2.5, retries=1, sleep=Sleeps())
    assert (r.status, r.attempts) == ("timeout", 2) and "stalled for 2.5 s" in r.reason
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["ftp://x/a.jpg", "file:///etc/passwd", "x/a.jpg", "", "javascript:alert(1)"])
def test_only_http_and_https_urls_are_fetched(tmp_path, url):
    r = scrape_fetch.fetch_url(url, tmp_path, sleep=Sleeps())
    assert (r.status, r.attempts, r.path) == ("bad_url", 0, None) and "http" in r.reason


@pytest.mark.parametrize("head, words", [
    (b"", "0 bytes"),
    (b"<!DOCTYPE HTML PUBLIC><title>x</title>", "HTML"),
    (b"  \n<HTML lang=en>", "HTML"),
    (b"<?xml version='1.0'?><!-- x --><html>", "HTML"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
    (b"\n<?xml version='1.0'?>\n<SVG width='1'/>", "SVG"),
    (b"%PDF-1.7 and more", "b'%PDF-1.7'"),
])
def test_non_images_are_described(head, words):
    assert words in scrape_fetch.describe_non_image(head)


def test_html_past_the_first_512_bytes_is_unknown_content():
    assert "HTML" not in scrape_fetch.describe_non_image(b"x" * 508 + b"<html>")  # "<html" ends at byte 513
    assert "HTML" in scrape_fetch.describe_non_image(b"x" * 507 + b"<html>")  # ... at byte 512


def test_requests_carry_the_scraper_user_agent_and_ask_for_images(tmp_path, monkeypatch):
    """Many image hosts refuse urllib's default 'Python-urllib' agent; Accept puts images first."""
    sent = []

    def capture(req, timeout):
        sent.append(req)
        raise urllib.error.URLError("stop here")

    monkeypatch.setattr(scrape_fetch._OPENER, "open", capture)
    r = scrape_fetch.fetch_url("http://images.example/a.jpg", tmp_path, retries=0, sleep=Sleeps())
    assert r.status == "network_error" and len(sent) == 1
    headers = {k.lower(): v for k, v in sent[0].header_items()}
    assert headers["user-agent"] == scrape_fetch.USER_AGENT and "fastlesson" in headers["user-agent"]
    assert headers["accept"].lower().startswith("image/*")  # MIME types are case-insensitive


def test_a_server_that_hangs_up_is_a_network_error_and_https_is_accepted(tmp_path):
    import threading

    with socket.socket() as srv:  # accepts, then closes without a status line
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def hang_up():
            for _ in range(2):  # the first try and the retry
                conn, _ = srv.accept()
                conn.recv(1024)
                conn.close()

        t = threading.Thread(target=hang_up, daemon=True)
        t.start()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/x.jpg"
        r = scrape_fetch.fetch_url(url, tmp_path, retries=1, sleep=lambda s: None)
        t.join(10)
    assert (r.status, r.attempts) == ("network_error", 2) and "RemoteDisconnected" in r.reason
    https = scrape_fetch.fetch_url(refused_url().replace("http:", "https:"), tmp_path, retries=0)
    assert https.status == "network_error"  # tried, not refused as a bad URL
    assert list(tmp_path.iterdir()) == []
