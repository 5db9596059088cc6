"""Open photos as RGB the way a person sees them, and decode big JPEGs at reduced scale for free.

``load_rgb(src)`` applies EXIF rotation, turns palette transparency into alpha and composites alpha on
white. ``load_rgb(src, min_side=s)`` also asks the JPEG decoder for a 1/2, 1/4 or 1/8 scale decode
(PIL's ``Image.draft``) whose short side is still at least ``s`` pixels: a 4000x3000 photo needed at
200 px decodes as 500x375, several times faster than a full decode followed by a resize.
Other formats ignore ``min_side`` and decode at full size.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

# one implementation, in the file a Hugging Face Space runs on its own (no fastlesson there)
from fastlesson.space_app import reduce_image, reduced_size  # noqa: F401  (reduced_size re-exported)

__all__ = ["draft_size", "load_rgb", "reduced_size"]

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


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
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency -> real alpha, composited below
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    img = img.convert("RGB")
    return reduce_image(img, full, min_side) if reduce and min_side is not None else img
