"""Data sources (sample, flowers, cifar10/100, Udacity or ImageNet-style folders) -> checked fastai DataLoaders."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.external import URLs, untar_data
from fastai.data.transforms import ColReader, ColSplitter, IntToFloatTensor, get_image_files
from fastai.torch_core import set_seed
from fastai.vision.augment import (
    CropPad,
    Flip,
    PadMode,
    RandomCrop,
    RandomResizedCrop,
    Resize,
    aug_transforms,
)
from fastai.vision.core import PILImage
from fasttransform import Transform
from PIL import Image

from fastlesson._io import atomic_write
from fastlesson.images import load_rgb

__all__ = ["SOURCES", "DataResult", "ImageOpener", "decode_side", "default_image_cache", "flower_names",
           "image_problem", "load_data", "open_reduced", "sample_path"]

SOURCES = ("sample", "flowers", "cifar10", "cifar100")  # besides a folder path
URLS = {"flowers": URLs.FLOWERS, "cifar10": URLs.CIFAR, "cifar100": URLs.CIFAR_100}
MIN_TRAIN_PER_CLASS = 2  # fewer training images than this cannot teach a class anything
SMALL_IMAGE_PX = 64  # images this small (longest side, px) get CIFAR-style augmentation
VALID_DIRS = ("valid", "val", "test")  # first one present next to train/ is the validation split
# Validation (and prediction) view of a photo: resize to size * (1 + VAL_XTRA), centre-crop `size` (fastai's
# RandomResizedCrop at split_idx=1; its default 0.14 is the usual 0.875 crop). Training crops of min_scale
# 0.35 show objects ~1.2x larger than that, so a tighter crop matches them better (Touvron et al. 2019,
# "Fixing the train-test resolution discrepancy"). flowers102-small, lite0 at 160 px, two trained models:
# 0.14 -> 88.0% / 88.9%, 0.25 -> 89.0% / 90.5%, 0.35 -> 88.5% / 88.8%, 0.5 -> 86.9% (first model)
VAL_XTRA = 0.25
MIN_SCALE = 0.35  # smallest training crop, as a fraction of the image area
# Big photos: every image is opened at most `decode_side` px on its short side (JPEGs decoded at 1/2, 1/4
# or 1/8 scale by PIL's draft mode, then resized), and images at least CACHE_FACTOR times that get a
# resized copy on disk, made once in load_data: a 12-megapixel JPEG costs ~50-130 ms to decode even at
# 1/8 scale (the entropy decoding reads every byte), its cached 267x200 copy ~1 ms.
CACHE_FACTOR = 2  # short side / decode side from which a reduced copy is cached
CACHE_ENV = "FASTLESSON_CACHE"  # overrides the cache root (default $XDG_CACHE_HOME or ~/.cache, + fastlesson)
CACHE_FORMAT = "r2"  # bump when the reduced copies change (resize filter, format): old files are ignored
PREPARE_THREADS = 4  # PIL decodes, resizes and hashlib hashes with the GIL released


@dataclass
class DataResult:
    """DataLoaders plus what was loaded and what was skipped (with reasons)."""

    dls: object
    classes: list[str]
    source: str
    path: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    size: int = 224
    n_train: int = 0
    n_valid: int = 0
    split: str = ""  # how the validation set was chosen: a folder name, a label file, or "random"
    decode_side: int | None = None  # px: no image is opened larger than this on its short side
    image_cache: Path | None = None  # folder of the reduced copies of big photos (None: none was needed)
    n_cached: int = 0  # images read from reduced copies instead of being decoded every epoch


def sample_path() -> Path:
    """The small real flower sample shipped inside the package (Udacity layout)."""
    return Path(str(resources.files("fastlesson") / "assets" / "sample"))


def flower_names() -> dict[str, str]:
    """Oxford 102 class number ('1'..'102', as in Udacity folders) -> flower name."""
    text = (resources.files("fastlesson") / "assets" / "flower_names.json").read_text()
    return json.loads(text)


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a training image, or None when it decodes."""
    try:
        if Path(path).stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            im.verify()  # structure and checksums, no pixel decode
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still reads every byte
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"unreadable image ({type(err).__name__}: {err})"
    return None


# An item is (image path, class name, is_valid).
Item = tuple[Path, str, bool]


# ------------------------------------------------------------------ opening big photos fast

def decode_side(size: int, val_xtra: float = VAL_XTRA) -> int:
    """Short side (px) an image needs for `size`-px crops: fastai's validation resize, size + ceil(size*xtra/8)*8."""
    return size + math.ceil(size * val_xtra / 8) * 8


def open_reduced(path, side: int) -> Image.Image:
    """RGB image, EXIF-upright, short side min(its own, `side`) px; JPEGs decoded at reduced scale.

    The output size is computed from the full-size image, so a drafted decode (1/8 of 1200x900 is
    150x113) and a full decode give the same size (107x80 at 80 px). The same function as predict's
    and the app's decode (fastlesson.images.load_rgb with min_side).
    """
    return load_rgb(path, min_side=side, reduce=True)


def default_image_cache() -> Path:
    """Where reduced copies of big photos go: $FASTLESSON_CACHE/images, else ~/.cache/fastlesson/images."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "fastlesson"
    return Path(root).expanduser() / "images"


class ImageOpener(Transform):
    """fastai type transform (PILImage.create's place): a path -> PILImage at most `side` px on its short side.

    `cached` maps a source path to its reduced copy on disk; a copy that has gone (the cache was deleted)
    is made again in memory, with the same pixels.
    """

    def __init__(self, side: int, cached: dict[str, str] | None = None):
        super().__init__()
        self.side, self.cached = side, dict(cached or {})

    def encodes(self, fn):
        if not isinstance(fn, (str, Path)):
            return PILImage.create(fn)  # tensors, arrays, PIL images: fastai's own conversion
        copy = self.cached.get(str(fn))
        if copy is not None:
            try:
                return PILImage.create(load_rgb(copy))
            except (FileNotFoundError, ValueError):
                pass  # deleted or damaged copy: the cache is only a cache, decode the original
        return PILImage.create(open_reduced(fn, self.side))


def _cache_file(cache_dir: Path, data: bytes, side: int) -> Path:
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()  # the file's content, not its name or date
    return cache_dir / digest[:2] / f"{digest}-{side}px-{CACHE_FORMAT}.bmp"


def _problem(path: Path, data: bytes) -> str | None:
    """image_problem's verify step on bytes already read."""
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"unreadable image ({type(err).__name__}: {err})"
    return None


def _prepare(path: Path, side: int, cache_dir: Path | None, check: bool) -> tuple[str | None, Path | None]:
    """(problem or None, reduced copy or None) for one image; a big one is decoded once and cached."""
    if cache_dir is None:
        return (image_problem(path) if check else None), None
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            big = min(im.size) >= CACHE_FACTOR * side
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return (image_problem(path) if check else None), None
    if not big:
        return (image_problem(path) if check else None), None
    out = _cache_file(cache_dir, data, side)
    if out.is_file():
        return None, out  # these very bytes decoded fine when the copy was made
    problem = _problem(path, data) if check else None
    if problem:
        return problem, None
    try:
        img = open_reduced(path, side)
    except ValueError as err:  # load_rgb's message; image_problem's wording for the skip list
        cause = err.__cause__ or err
        return (f"unreadable image ({type(cause).__name__}: {cause})" if check else None), None
    try:
        # BMP: lossless and uncompressed; a 267x200 copy opens 8x faster than as PNG and 2.4x faster than
        # as JPEG q95 (lossy), at 160 KB per image
        atomic_write(out, lambda p: img.save(p, format="BMP"))
    except OSError as err:
        raise OSError(f"cannot write reduced copies of big photos to {cache_dir} ({err}); pass "
                      f"image_cache=<a writable folder>, or image_cache=False to decode them every epoch") from err
    return None, out


def _prepare_all(items: list[Item], side: int, cache_dir: Path | None, check: bool,
                 skipped: list) -> tuple[list[Item], dict[str, str]]:
    """Checked items and {source path: reduced copy}; images decode in parallel threads."""
    if cache_dir is None and not check:
        return items, {}
    with ThreadPoolExecutor(max_workers=min(PREPARE_THREADS, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda it: _prepare(it[0], side, cache_dir, check), items))
    good, cached = [], {}
    for it, (problem, copy) in zip(items, results):
        if problem:
            skipped.append((it[0], problem))
            continue
        good.append(it)
        if copy is not None:
            cached[str(it[0])] = str(copy)
    return good, cached


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist: check the path or the data layout "
                                f"(train/ + valid/ class folders, or one folder of class folders)")
    return path


def _class_images(split_dir: Path, is_valid: bool, skipped: list) -> list[Item]:
    """Images under `split_dir`, labelled by their parent folder (CIFAR-100's nested folders work too)."""
    items = []
    for f in sorted(get_image_files(split_dir)):  # sorted: the same items in the same order on any disk
        if f.parent == split_dir:
            skipped.append((f, f"not inside a class folder of {split_dir}"))
        else:
            items.append((f, f.parent.name, is_valid))
    return items


def _random_split(items: list[Item], valid_pct: float, seed: int) -> list[Item]:
    """Seeded per-class split, so small classes keep training images (fastai's RandomSplitter is not stratified)."""
    if not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct={valid_pct!r} must be between 0 and 1 (e.g. 0.2) to split a single folder")
    rng = np.random.default_rng(seed)
    out = []
    for label in sorted({lbl for _, lbl, _ in items}):
        files = sorted(f for f, lbl, _ in items if lbl == label)
        n_valid = int(round(len(files) * valid_pct)) if len(files) > MIN_TRAIN_PER_CLASS else 0
        valid = set(rng.permutation(len(files))[:n_valid].tolist())
        out += [(f, label, i in valid) for i, f in enumerate(files)]
    return out


def _folder_items(path: Path, valid_pct: float, seed: int, skipped: list) -> tuple[list[Item], str]:
    """Items of a Udacity / ImageNet-style (train + valid|val|test) folder or a single folder of classes."""
    path = _require_dir(Path(path).expanduser(), "Data")
    train = path / "train"
    if train.is_dir():
        valid = next((path / d for d in VALID_DIRS if (path / d).is_dir()), None)
        items = _class_images(train, False, skipped)
        if valid is None:
            return _random_split(items, valid_pct, seed), "random"
        return items + _class_images(valid, True, skipped), valid.name
    return _random_split(_class_images(path, False, skipped), valid_pct, seed), "random"


def _flowers_items(path: Path, skipped: list) -> tuple[list[Item], str]:
    """Items from the Oxford archive's own label files: lines 'jpg/image_NNNNN.jpg LABEL', LABEL 0-based."""
    names = flower_names()
    items = []
    for split, is_valid in (("train.txt", False), ("valid.txt", True)):
        labels = path / split
        if not labels.is_file():
            raise FileNotFoundError(f"{labels} is missing: the flowers archive should hold jpg/, train.txt, "
                                    f"valid.txt and test.txt; delete {path} to download it again")
        for line in labels.read_text().split("\n"):
            if not line.strip():
                continue
            rel, label = line.split()
            f = path / rel
            if not f.is_file():
                skipped.append((f, f"listed in {split} but missing"))
                continue
            # 0-based archive labels: image_03860 is labelled 16 and sits in Udacity folder 17
            items.append((f, names[str(int(label) + 1)], is_valid))
    return items, "train.txt/valid.txt"


def _rename(items: list[Item], names: dict[str, str], json_path: Path) -> list[Item]:
    """Folder labels -> human names from a cat_to_name.json; two folders may not share a name."""
    folders = sorted({lbl for _, lbl, _ in items})
    mapped = {lbl: names.get(lbl, lbl) for lbl in folders}
    seen: dict[str, str] = {}
    for folder, name in mapped.items():
        if name in seen:
            raise ValueError(f"{json_path} gives folders {seen[name]!r} and {folder!r} the same name {name!r}: "
                             f"fix the JSON so each class has its own name")
        seen[name] = folder
    return [(f, mapped[lbl], v) for f, lbl, v in items]


def _check(items: list[Item], path: Path, split: str) -> list[Item]:
    """Fail on an empty split or a class too small to learn (unreadable images are already dropped)."""
    n_train = sum(not v for _, _, v in items)
    n_valid = len(items) - n_train
    if n_train == 0:
        raise ValueError(f"No readable training images in {path}: add class folders of images under "
                         f"{path / 'train' if split != 'random' else path}")
    if n_valid == 0:
        where = path / split if split not in ("random", "train.txt/valid.txt") else path
        raise ValueError(f"The validation split of {path} is empty ({where}): add images there, or pass a "
                         f"larger valid_pct for a single folder of classes")
    counts: dict[str, int] = {}
    for _, lbl, v in items:
        counts[lbl] = counts.get(lbl, 0) + (not v)
    small = {lbl: n for lbl, n in sorted(counts.items()) if n < MIN_TRAIN_PER_CLASS}
    if small:
        listed = ", ".join(f"{lbl!r} ({n})" for lbl, n in small.items())
        raise ValueError(f"Classes with fewer than {MIN_TRAIN_PER_CLASS} training images in {path}: {listed}. "
                         f"Add images to them or remove those class folders.")
    return items


def _is_small(items: list[Item]) -> bool:
    """Whether the first image that opens is CIFAR-sized (header only, no decode)."""
    for f, _, _ in items:
        try:
            with Image.open(f) as im:
                return max(im.size) <= SMALL_IMAGE_PX
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue
    return False


def _item_side(size: int, item_size: int | None, aug: bool, small: bool) -> int:
    """Short side (px) the item transforms of `_tfms` need, so no image is opened larger than that."""
    if small:
        return size
    return decode_side(item_size or size) if aug else (item_size or size)


def _tfms(size: int, item_size: int | None, aug: bool, small: bool):
    """(item_tfms, batch_tfms): lesson-style crops and warps for photos; pad-crop + flip for tiny images."""
    if small:
        # CIFAR recipe: reflect-pad by 1/8 and crop back at random (centre on valid). fastai sorts item
        # transforms by `order` (CropPad 0, Resize 1, ToTensor 5): force Resize -> pad -> crop -> tensor.
        item = [Resize(size)]
        if aug:
            pad, crop = CropPad(size + 2 * max(1, size // 8), pad_mode=PadMode.Reflection), RandomCrop(size)
            pad.order, crop.order = 2, 3
            item += [pad, crop]
        return item, [Flip()] if aug else []
    item_size = item_size or size
    if not aug:
        return [Resize(item_size)], ([Resize(size)] if item_size != size else [])
    return [RandomResizedCrop(item_size, min_scale=MIN_SCALE, val_xtra=VAL_XTRA)], aug_transforms(size=size)


def _check_sizes(size, bs) -> None:
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size={size!r} must be an image side in pixels (int >= 8), e.g. 224")
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"bs={bs!r} must be a positive batch size, e.g. 64")


def _source_path(source, url: str | None, download_base) -> Path:
    """The local folder of `source`: downloaded (and unpacked) once for a named data set."""
    name = str(source)
    if name in URLS:
        try:
            return Path(untar_data(url or URLS[name], base=download_base))
        except OSError as err:  # URLError, refused connection: offline
            raise FileNotFoundError(
                f"Could not download {name!r} from {url or URLS[name]} ({type(err).__name__}: {err}). Offline? "
                f"Use --data sample (shipped with fastlesson) or --data PATH to a local folder.") from err
    if name == "sample":
        return sample_path()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"Data folder {path} does not exist: pass one of {', '.join(SOURCES)} "
                                f"or a folder of class folders (train/ + valid/, or one folder)")
    return path


def _source_items(name: str, path: Path, valid_pct: float, seed: int, skipped: list) -> tuple[list[Item], str]:
    """(items, how the validation split was chosen) for the source `name` found at `path`."""
    if name == "flowers":
        return _flowers_items(path, skipped)
    items, split = _folder_items(path, valid_pct, seed, skipped)
    names_json = path / "cat_to_name.json"
    if names_json.is_file():
        items = _rename(items, json.loads(names_json.read_text()), names_json)
    return items, split


def _dataloaders(items: list[Item], tfms, opener: ImageOpener, bs: int, seed: int, num_workers: int, device):
    """Seeded fastai DataLoaders over `items` through fastai's DataBlock; `tfms` = (item_tfms, batch_tfms)."""
    classes = sorted({lbl for _, lbl, _ in items})
    image = TransformBlock(type_tfms=opener, batch_tfms=IntToFloatTensor)  # ImageBlock's, with our opener
    block = DataBlock(blocks=(image, CategoryBlock(vocab=classes)),
                      get_x=ColReader("path"), get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                      item_tfms=tfms[0], batch_tfms=tfms[1])
    set_seed(seed)  # the loaders' shuffle RNGs are drawn from the global seed when they are created
    df = pd.DataFrame(items, columns=["path", "label", "is_valid"])
    return block.dataloaders(df, bs=bs, num_workers=num_workers, device=device)


def load_data(source, size: int = 224, bs: int = 64, seed: int = 42, valid_pct: float = 0.2,
              num_workers: int = 0, item_size: int | None = None, aug: bool = True,
              small: bool | None = None, check_images: bool = True, url: str | None = None,
              download_base: str | Path | None = None, device=None,
              image_cache: str | Path | bool = True) -> DataResult:
    """Seeded fastai DataLoaders for `source` ('sample', 'flowers', 'cifar10', 'cifar100' or a folder).

    Images are opened no larger than the transforms need (`decode_side`); big photos (twice that on
    their short side) are decoded once, here, and their reduced copies kept in `image_cache` (True: the
    default folder, see `default_image_cache`; a path; False: decode them at reduced scale every epoch).
    """
    _check_sizes(size, bs)
    skipped: list[tuple[Path, str]] = []
    name = str(source)
    path = _source_path(source, url, download_base)
    items, split = _source_items(name, path, valid_pct, seed, skipped)
    if small is None:
        small = name.startswith("cifar") or _is_small(items)
    side = _item_side(size, item_size, aug, small)
    cache_dir = _cache_dir(image_cache, small)
    items, cached = _prepare_all(items, side, cache_dir, check_images, skipped)
    items = _check(items, path, split)
    dls = _dataloaders(items, _tfms(size, item_size, aug, small), ImageOpener(side, cached), bs, seed,
                       num_workers, device)
    n_valid = sum(v for _, _, v in items)
    return DataResult(dls=dls, classes=list(dls.vocab), source=name, path=path, skipped=skipped,
                      size=size, n_train=len(items) - n_valid, n_valid=n_valid, split=split,
                      decode_side=side, image_cache=cache_dir if cached else None, n_cached=len(cached))


def _cache_dir(image_cache, small: bool) -> Path | None:
    """The folder for reduced copies, or None (no cache, or CIFAR-sized images that never need one)."""
    if not (isinstance(image_cache, (bool, str, Path)) or image_cache is None):
        raise ValueError(f"image_cache={image_cache!r} must be True (default folder), a folder path, or False")
    if image_cache is False or image_cache is None or small:
        return None
    return default_image_cache() if image_cache is True else Path(image_cache).expanduser()
