"""Routes for scrape tests: good images plus every bad case the scraper must survive.

The server itself is fastlesson.loopback.LoopbackServer (shared with the scraping notebook).
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
from PIL import Image

from fastlesson.loopback import LoopbackServer

SLOW_S = 1.5  # s the slow route waits before answering; tests use a shorter timeout


def pattern(seed: int, size=(120, 90), mode="RGB") -> Image.Image:
    """A textured image whose perceptual hash is unrelated to other seeds' (smooth random blobs + noise)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert(mode)


def encode(im: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(w=20000, h=10000) -> bytes:
    """A ~25 KB 1-bit PNG that declares w x h pixels (all black): a decompression bomb."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    row = b"\x00" + b"\x00" * ((w + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgba_png() -> bytes:
    """Left half fully transparent over black pixels: flattening on white must make it white."""
    im = pattern(101).convert("RGBA")
    a = np.asarray(im).copy()
    a[:, : a.shape[1] // 2, :3] = 0
    a[:, : a.shape[1] // 2, 3] = 0
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def palette_png() -> bytes:
    """A palette PNG whose left half uses a transparent index."""
    im = pattern(102).quantize(64)
    a = np.asarray(im).copy()
    a[a == 0] = 1
    a[:, : a.shape[1] // 2] = 0
    out = Image.fromarray(a, "P")
    out.putpalette(im.getpalette())
    return encode(out, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [pattern(103 + i) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 120x90 landscape with EXIF Orientation 6: displayed as 90x120 portrait."""
    im = pattern(104)
    exif = im.getexif()
    exif[0x0112] = 6
    return encode(im, "JPEG", exif=exif.tobytes(), quality=90)


def gray16_png() -> bytes:
    a = (np.asarray(pattern(105).convert("L"), dtype=np.uint16) * 100 + 10000).astype(np.uint16)
    return encode(Image.fromarray(a), "PNG")  # uint16 -> mode I;16


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">' \
      b'<rect width="100" height="100" fill="red"/></svg>'
HTML = b"<!DOCTYPE html><html><body>Access denied</body></html>"


def build_routes(n_good=7, max_bytes=200_000) -> dict:
    """path -> (status, headers, body) or a special name; GOOD images per class under /good/<cls>/<i>.jpg."""
    routes: dict = {}
    for ci, cls in enumerate(("daisy", "horse")):
        for i in range(n_good):
            routes[f"/good/{cls}/{i}.jpg"] = (200, {"Content-Type": "image/jpeg"},
                                              encode(pattern(1000 * ci + i), quality=90))
    shared = routes["/good/daisy/0.jpg"][2]
    near = encode(pattern(0).resize((96, 72), Image.Resampling.BILINEAR), quality=60)
    jpeg = encode(pattern(106), quality=90)
    routes.update({
        "/missing.jpg": (404, {}, b"not found"),
        "/error.jpg": (500, {}, b"boom"),
        "/flaky.jpg": "flaky",  # 503 on the first request, then an image
        "/slow.jpg": "slow",
        "/loop/a": (302, {"Location": "/loop/b"}, b""),
        "/loop/b": (302, {"Location": "/loop/a"}, b""),
        "/moved.jpg": (301, {"Location": "/target.jpg?from=moved"}, b""),
        "/target.jpg": (200, {}, encode(pattern(110), quality=90)),
        "/page.jpg": (200, {"Content-Type": "image/jpeg"}, HTML),
        "/empty.jpg": (200, {"Content-Type": "image/jpeg"}, b""),
        "/truncated.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg[: len(jpeg) * 2 // 3]),
        "/vector.svg": (200, {"Content-Type": "image/svg+xml"}, SVG),
        "/bomb.png": (200, {"Content-Type": "image/png"}, png_bomb()),
        "/cmyk.jpg": (200, {}, encode(pattern(107, mode="CMYK"), quality=90)),
        "/rgba.png": (200, {}, rgba_png()),
        "/palette.png": (200, {}, palette_png()),
        "/anim.gif": (200, {}, animated_gif()),
        "/exif.jpg": (200, {}, exif_rotated_jpeg()),
        "/gray16.png": (200, {}, gray16_png()),
        "/tiny.png": (200, {}, encode(pattern(108, size=(20, 16)), "PNG")),
        "/huge.jpg": "huge",  # streamed body over max_bytes, no Content-Length
        "/huge-declared.jpg": (200, {"Content-Length": str(max_bytes * 10)}, b"\xff\xd8\xff" + b"0" * 100),
        "/select": "select",  # /select?id=N: the query string picks the image
        "/dup-copy.jpg": (200, {}, shared),  # byte-identical to /good/daisy/0.jpg
        "/near-copy.jpg": (200, {}, near),  # resized + re-encoded /good/daisy/0.jpg
        "/cross.jpg": (200, {}, routes["/good/daisy/1.jpg"][2]),  # a daisy image listed as horse
    })
    return routes


class ScrapeServer(LoopbackServer):
    """fastlesson's LoopbackServer with build_routes' named behaviours; `hits` counts path+query."""

    def __init__(self, routes: dict, max_bytes: int):
        self.max_bytes = max_bytes
        super().__init__({path: self._behaviour(spec) if isinstance(spec, str) else spec
                          for path, spec in routes.items()})

    def _behaviour(self, name: str):
        """The route function for one of build_routes' named routes."""
        return {"slow": self._slow, "flaky": _flaky, "select": _select, "huge": self._huge}[name]

    def _slow(self, query: str, n: int):
        time.sleep(SLOW_S)
        return self.routes["/good/horse/1.jpg"]

    def _huge(self, query: str, n: int):
        """A JPEG signature then zeros past max_bytes, streamed with no Content-Length."""
        chunks = [b"\xff\xd8\xff\xe0"] + [b"\0" * 8192] * (self.max_bytes // 8192 + 4)
        return 200, {"Content-Type": "image/jpeg"}, iter(chunks)


def _flaky(query: str, n: int):
    """503 on the first request, then an image."""
    return (503, {}, b"busy") if n == 1 else (200, {}, encode(pattern(109), quality=90))


def _select(query: str, n: int):
    """/select?id=N: the query string picks the image."""
    ident = int(dict(p.split("=") for p in query.split("&"))["id"])
    return 200, {}, encode(pattern(200 + ident), quality=90)
