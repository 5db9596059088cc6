"""Small learnable image folders made on the spot: the one home for tests, notebooks and smoke runs.

`make_image_folder` writes real image files in the layouts `load_data` reads, with a class signal a
model picks up in a few steps: a dominant colour channel (`style="colour"`), or simple drawings of
daisies, horses and mangoes (`style="drawing"`, the stand-in for photos in the scraping notebook).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["LAYOUTS", "STYLES", "DRAWABLE", "make_image_folder", "draw_picture"]

LAYOUTS = ("imagenet", "flat")  # root/train|<valid_name>/<cls>/ or root/<cls>/
STYLES = ("colour", "drawing")
LEVEL_STEP = 30  # colour style: classes i and i+3 share a channel, raised 30 more per round of three
JPEG_QUALITY = 90
DRAW_MARGIN = 35  # px, drawing style: shapes are centred at least this far from the border
# drawing style: background colour (RGB) per class that draw_picture knows
DRAW_BACKGROUND = {"daisy": (60, 140, 50), "horse": (150, 200, 240), "mango": (210, 190, 150)}
DRAWABLE = tuple(DRAW_BACKGROUND)


def make_image_folder(root, classes: Sequence[str] = ("a", "b", "c"), n_train: int = 8,
                      n_valid: int = 4, size: int | tuple[int, int] = (80, 64), *,
                      layout: str = "imagenet", valid_name: str = "valid", style: str = "colour",
                      fmt: str = "jpg", noise: int = 70, level: int = 150, seed: int = 0) -> Path:
    """Write `n_train` (+ `n_valid`) images per class under `root` and return `root` as a Path.

    layout "imagenet": root/train/<cls>/ and root/<valid_name>/<cls>/ ("test" for a train/test
    folder); "flat": root/<cls>/ with `n_train` images each (`n_valid` unused). Files are
    img_000.<fmt>, ... (fmt "jpg" at quality 90, or lossless "png"); `size` is px, an int for a
    square or (width, height). style "colour": uniform noise in [0, noise) on every channel, and
    channel i % 3 raised by `level` (+30 per round of three classes) for class i; "drawing":
    `draw_picture` of each class (square sizes only, classes from DRAWABLE). One generator seeded
    with `seed` draws every image in order (split, class, image), so a folder is reproducible.
    """
    w, h = _check(classes, n_train, n_valid, size, layout, style, fmt)
    rng = np.random.default_rng(seed)
    root = Path(root)
    splits = {"train": n_train, valid_name: n_valid} if layout == "imagenet" else {"": n_train}
    for split, n in splits.items():
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = _colour_image(ci, w, h, noise, level, rng) if style == "colour" else draw_picture(cls, rng, w)
                im.save(folder / f"img_{i:03d}.{fmt}", **({"quality": JPEG_QUALITY} if fmt == "jpg" else {}))
    return root


def _check(classes, n_train, n_valid, size, layout, style, fmt) -> tuple[int, int]:
    """Validate make_image_folder's arguments; return the image size as (width, height)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {LAYOUTS}")
    if style not in STYLES:
        raise ValueError(f"style={style!r}: use one of {STYLES}")
    if fmt not in ("jpg", "png"):
        raise ValueError(f"fmt={fmt!r}: use 'jpg' or 'png'")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes={list(classes)!r}: need at least one class, no repeats")
    if n_train < 1 or n_valid < 0:
        raise ValueError(f"n_train={n_train}, n_valid={n_valid}: need n_train >= 1 and n_valid >= 0")
    w, h = (size, size) if isinstance(size, int) else size
    if w < 1 or h < 1:
        raise ValueError(f"size={size!r}: width and height must be positive pixels")
    if style == "drawing":
        unknown = [c for c in classes if c not in DRAW_BACKGROUND]
        if unknown or w != h or w <= 2 * DRAW_MARGIN:
            raise ValueError(f"style='drawing' with classes={list(classes)!r}, size={size!r}: classes must "
                             f"be among {DRAWABLE} and the size square and over {2 * DRAW_MARGIN} px")
    return w, h


def _colour_image(ci: int, w: int, h: int, noise: int, level: int, rng) -> Image.Image:
    """Class `ci` as a dominant colour channel over uniform noise."""
    arr = rng.integers(0, noise, (h, w, 3))
    arr[..., ci % 3] += level + LEVEL_STEP * (ci // 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_picture(cls: str, rng, px: int = 128) -> Image.Image:
    """A random px x px drawing of a daisy, a horse or a mango (a stand-in for a photo)."""
    bg = DRAW_BACKGROUND[cls]
    im = Image.new("RGB", (px, px), tuple(int(c + rng.integers(-40, 40)) for c in bg))
    d = ImageDraw.Draw(im)
    x, y = (int(v) for v in rng.integers(DRAW_MARGIN, px - DRAW_MARGIN, size=2))
    r = int(rng.integers(14, 30))
    {"daisy": _daisy, "horse": _horse, "mango": _mango}[cls](d, rng, x, y, r, px)
    return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))


def _daisy(d: ImageDraw.ImageDraw, rng, x: int, y: int, r: int, px: int) -> None:
    for a in np.linspace(0, 2 * np.pi, int(rng.integers(8, 14)), endpoint=False):
        cx, cy = x + r * np.cos(a), y + r * np.sin(a)
        d.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=(250, 250, 245))  # petals
    d.ellipse([x - r / 2, y - r / 2, x + r / 2, y + r / 2], fill=(240, 200, 20))  # centre


def _horse(d: ImageDraw.ImageDraw, rng, x: int, y: int, r: int, px: int) -> None:
    d.rectangle([0, px * 2 // 3, px, px], fill=(70, 150, 60))  # grass
    brown = tuple(int(c) for c in rng.integers([90, 50, 20], [160, 100, 60]))
    d.ellipse([x - r, y - r / 2, x + r, y + r / 2], fill=brown)  # body
    d.ellipse([x + r - 4, y - r, x + r + 10, y - r / 3], fill=brown)  # head
    for lx in (x - r + 4, x - r / 3, x + r / 3, x + r - 6):
        d.rectangle([lx, y + r / 3, lx + 4, y + r * 1.3], fill=brown)  # legs


def _mango(d: ImageDraw.ImageDraw, rng, x: int, y: int, r: int, px: int) -> None:
    colour = tuple(int(c) for c in rng.integers([220, 110, 0], [255, 200, 60]))
    d.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=colour)  # fruit
    d.ellipse([x + r - 6, y - r * 0.7, x + r + 2, y - r * 0.4], fill=(60, 130, 40))  # leaf
