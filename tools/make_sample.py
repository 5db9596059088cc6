"""Build fastlesson/assets/sample: a small real flower sample (Udacity layout) from flowers102-small.

Usage: python tools/make_sample.py [SRC] [DEST]
One class per decade of class numbers (the first at or after 1, 11, ..., 91 with enough valid
images), the first 16 train and 6 valid images of each by file name,
shrunk to 128 px on the short side and saved as JPEG quality 80 (total well under 2 MB).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers102-small"
DEST = Path(__file__).resolve().parents[1] / "fastlesson" / "assets" / "sample"
STARTS = range(1, 102, 10)  # one class per decade of Oxford class numbers: the first one >= 1, 11, ..., 91
PER_SPLIT = {"train": 16, "valid": 6}  # images per class
SHORT_SIDE = 128  # px
QUALITY = 80  # JPEG


def shrink(src: Path, dest: Path) -> None:
    """Save `src` as an RGB JPEG with the short side SHORT_SIDE px."""
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = SHORT_SIDE / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        im.save(dest, "JPEG", quality=QUALITY, optimize=True)


def pick_class(src: Path, start: int) -> str:
    """First class number >= `start` with enough images in every split."""
    for c in range(start, 103):
        if all(len(list((src / split / str(c)).glob("*.jpg"))) >= n for split, n in PER_SPLIT.items()):
            return str(c)
    raise FileNotFoundError(f"No class >= {start} in {src} has {PER_SPLIT} images")


def main(src: Path = SRC, dest: Path = DEST) -> int:
    names = json.loads((src / "cat_to_name.json").read_text())
    classes = [pick_class(src, start) for start in STARTS][:10]
    if dest.exists():
        shutil.rmtree(dest)
    for split, n in PER_SPLIT.items():
        for cls in classes:
            for f in sorted((src / split / cls).glob("*.jpg"))[:n]:
                shrink(f, dest / split / cls / f.name)
    (dest / "cat_to_name.json").write_text(json.dumps({c: names[c] for c in classes}, indent=1) + "\n")
    (dest / "README.md").write_text(
        "# fastlesson offline sample\n\n10 Oxford 102 flower classes (one per decade of class numbers), 16 train + 6 valid images "
        "each, from the Udacity flower_data split (Nilsback & Zisserman 2008), short side 128 px, JPEG q80.\n"
        "Rebuild with `python tools/make_sample.py`.\n")
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {sum(1 for _ in dest.rglob('*.jpg'))} images, {total} bytes")
    return total


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:3]))
