"""Open photos as RGB the way a person sees them, and decode big JPEGs at reduced scale for free.

``load_rgb(src)`` applies EXIF rotation, turns palette transparency into alpha and composites alpha on
white. ``load_rgb(src, min_side=s)`` also asks the JPEG decoder for a 1/2, 1/4 or 1/8 scale decode
(PIL's ``Image.draft``) whose short side is still at least ``s`` pixels: a 4000x3000 photo needed at
200 px decodes as 500x375, several times faster than a full decode followed by a resize.
Other formats ignore ``min_side`` and decode at full size.
``to_rgb(img)`` is the mode conversion on its own (the scraper also runs ``to_8bit`` first, which scales
16-bit and float images where PIL would clip them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# one implementation, in the file a Hugging Face Space runs on its own (no fastlesson there)
from fastlesson.space_app import reduce_image, reduced_size  # noqa: F401  (reduced_size re-exported)

__all__ = ["draft_size", "load_rgb", "reduced_size", "to_8bit", "to_rgb"]

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # single-channel, more than 8 bits a sample


def _check_min_side(min_side) -> None:
    if min_side is None:
        return
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1:
        raise ValueError(f"min_side={min_side!r} must be a positive number of pixels (int), e.g. 200, "
                         f"or None to decode at full size")


def draft_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The (w, h) PIL's JPEG draft decodes `size` to when asked for a short side of at least `min_side`."""
    w, h = size
    scale = min(w // min_side, h // min_side)  # PIL's own rule: the largest of 8, 4, 2, 1 that fits
    s = next(s for s in (8, 4, 2, 1) if scale >= s or s == 1)
    return (w + s - 1) // s, (h + s - 1) // s


def _open(path: Path, min_side: int | None) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist; check the path")
    try:
        img = Image.open(path)
        img._fastlesson_full = img.size  # header size, before a drafted decode shrinks it
        if min_side is not None:
            # Both sides >= min_side, so the short side is too, in either orientation: EXIF rotation
            # happens after the decode and only swaps width and height.
            img.draft("RGB", (min_side, min_side))  # JPEG only; a no-op for other formats
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{str(path)!r} is not a readable image ({type(e).__name__}: {e})") from e
    return img


def to_rgb(img: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Any PIL mode -> RGB: palette transparency and alpha composited on white, CMYK/palette/grey converted.

    Appends what it changed to `notes` ("palette->RGB", "alpha on white", "CMYK->RGB", ...). 16-bit and
    float images are clipped by PIL's own conversion here; pass them through `to_8bit` first to scale them.
    """
    notes = [] if notes is None else notes
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("palette->RGB")
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
        notes.append("alpha on white")
    if img.mode != "RGB":
        notes.append(f"{img.mode}->RGB")
        img = img.convert("RGB")
    return img


def to_8bit(img: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """A 16-bit or float single-channel image -> 8-bit 'L', scaled rather than clipped; others unchanged.

    16-bit samples (PIL opens 16-bit PNGs as 'I' too) map 65535 -> 255, values outside 0..65535 clip;
    float data has no fixed range, so it is stretched to 0..255. Appends "16-bit->8-bit" to `notes`.
    """
    if img.mode not in DEEP_MODES:
        return img
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255
    else:
        arr = arr / 257.0
    if notes is not None:
        notes.append("16-bit->8-bit")
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")


def load_rgb(src, min_side: int | None = None, reduce: bool = False) -> Image.Image:
    """Open an image as RGB the way a person sees it: EXIF rotation applied, transparency on white.

    With `min_side`, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose short side is
    still at least `min_side` pixels (a smaller JPEG stays at full size). With `reduce` too, any image
    with a longer short side is then resized (Lanczos) to exactly `min_side` on it: the image
    fastlesson's data pipeline trains on, and so what predict and the app start from for a model whose
    model.json records that `decode_side`. An already open `PIL.Image` is reduced the same way.
    """
    _check_min_side(min_side)
    img = src if isinstance(src, Image.Image) else _open(Path(src), min_side)
    full = getattr(img, "_fastlesson_full", img.size)
    img = to_rgb(ImageOps.exif_transpose(img))
    return reduce_image(img, full, min_side) if reduce and min_side is not None else img
