"""Verify and normalise one downloaded image into RGB JPEG bytes, plus its content and perceptual hashes."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import imagehash
from PIL import Image, ImageOps, UnidentifiedImageError

from fastlesson.images import to_8bit, to_rgb

JPEG_QUALITY = 90


@dataclass
class NormalisedImage:
    """Outcome of `normalise_image`: status 'ok' with JPEG bytes, or a rejection status and reason."""

    status: str  # ok | not_image | corrupt | bomb | too_small
    reason: str = ""
    data: bytes = b""  # the RGB JPEG to save
    sha256: str = ""  # of `data`, the normalised JPEG bytes (what the file name is made of)
    phash: str = ""  # 16 hex digits, 64-bit perceptual hash of the normalised image
    width: int = 0  # px, of the saved JPEG
    height: int = 0
    orig_size: tuple[int, int] = (0, 0)  # px, as downloaded (after EXIF rotation)
    notes: str = ""  # what normalisation did (first frame, rotated, alpha flattened, ...)


def phash_distance(a: str, b: str) -> int:
    """Hamming distance in bits between two 16-hex-digit perceptual hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def normalise_image(path: Path, *, max_size: int = 512, min_size: int = 64,
                    max_pixels: int = 40_000_000, quality: int = JPEG_QUALITY) -> NormalisedImage:
    """Fully decode `path`, refuse bombs before decoding, and return an RGB JPEG with longer side <= max_size."""
    notes: list[str] = []
    try:
        im = Image.open(path)  # reads the header only; PIL itself raises on > 2x its own cap
        with im:
            w, h = im.size
            # the pixel cap is checked on the header, before any pixel is decoded
            if w * h > max_pixels:
                return NormalisedImage("bomb", f"{w}x{h} = {w * h} pixels > cap {max_pixels}")
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                im.seek(0)
                notes.append(f"first of {n_frames} frames")
            # verify() would pass a truncated JPEG; load() decodes every byte and fails on it
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # 0x0112 = EXIF Orientation tag
                notes.append("EXIF rotation applied")
            # fastlesson.images' conversion, 16-bit scaled first: downloads become 8-bit JPEGs once
            im = to_rgb(to_8bit(ImageOps.exif_transpose(im), notes), notes)
    except Image.DecompressionBombError as e:
        return NormalisedImage("bomb", str(e))
    except UnidentifiedImageError as e:
        return NormalisedImage("not_image", f"PIL cannot identify it: {e}")
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated / malformed data
        return NormalisedImage("corrupt", f"decode failed: {type(e).__name__}: {e}")
    orig = im.size
    if min(orig) < min_size:
        return NormalisedImage("too_small", f"{orig[0]}x{orig[1]} px, shorter side < --min-size {min_size}",
                               orig_size=orig)
    if max(orig) > max_size:
        im.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        notes.append(f"resized from {orig[0]}x{orig[1]}")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    data = buf.getvalue()
    return NormalisedImage("ok", "", data, hashlib.sha256(data).hexdigest(), str(imagehash.phash(im)),
                           im.width, im.height, orig, "; ".join(notes))
