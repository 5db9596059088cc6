"""Data sources (sample, flowers, cifar10/100, Udacity or ImageNet-style folders) -> checked fastai DataLoaders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.external import URLs, untar_data
from fastai.data.transforms import ColReader, ColSplitter, get_image_files
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
from fastai.vision.data import ImageBlock
from PIL import Image

__all__ = ["SOURCES", "DataResult", "flower_names", "image_problem", "load_data", "sample_path"]

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


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist: check the path or the data layout "
                                f"(train/ + valid/ class folders, or one folder of class folders)")
    return path


def _class_images(split_dir: Path, is_valid: bool, skipped: list) -> list[Item]:
    """Images under `split_dir`, labelled by their parent folder (CIFAR-100's nested folders work too)."""
    items = []
    for f in get_image_files(split_dir):
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


def _check(items: list[Item], path: Path, split: str, check_images: bool, skipped: list) -> list[Item]:
    """Drop unreadable images (recorded in `skipped`); fail on an empty split or a class too small to learn."""
    if check_images:
        good = []
        for it in items:
            problem = image_problem(it[0])
            if problem:
                skipped.append((it[0], problem))
            else:
                good.append(it)
        items = good
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
    with Image.open(items[0][0]) as im:
        return max(im.size) <= SMALL_IMAGE_PX


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


def load_data(source, size: int = 224, bs: int = 64, seed: int = 42, valid_pct: float = 0.2,
              num_workers: int = 0, item_size: int | None = None, aug: bool = True,
              small: bool | None = None, check_images: bool = True, url: str | None = None,
              download_base: str | Path | None = None, device=None) -> DataResult:
    """Seeded fastai DataLoaders for `source` ('sample', 'flowers', 'cifar10', 'cifar100' or a folder)."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size={size!r} must be an image side in pixels (int >= 8), e.g. 224")
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"bs={bs!r} must be a positive batch size, e.g. 64")
    skipped: list[tuple[Path, str]] = []
    name = str(source)
    if name in URLS:
        try:
            path = untar_data(url or URLS[name], base=download_base)
        except OSError as err:  # URLError, refused connection: offline
            raise FileNotFoundError(
                f"Could not download {name!r} from {url or URLS[name]} ({type(err).__name__}: {err}). Offline? "
                f"Use --data sample (shipped with fastlesson) or --data PATH to a local folder.") from err
    elif name == "sample":
        path = sample_path()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"Data folder {path} does not exist: pass one of {', '.join(SOURCES)} "
                                    f"or a folder of class folders (train/ + valid/, or one folder)")
    path = Path(path)
    if name == "flowers":
        items, split = _flowers_items(path, skipped)
    else:
        items, split = _folder_items(path, valid_pct, seed, skipped)
        names_json = path / "cat_to_name.json"
        if names_json.is_file():
            items = _rename(items, json.loads(names_json.read_text()), names_json)
    items = _check(items, path, split, check_images, skipped)
    if small is None:
        small = name.startswith("cifar") or _is_small(items)

    item_tfms, batch_tfms = _tfms(size, item_size, aug, small)
    classes = sorted({lbl for _, lbl, _ in items})
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=classes)),
                      get_x=ColReader("path"), get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                      item_tfms=item_tfms, batch_tfms=batch_tfms)
    set_seed(seed)  # the loaders' shuffle RNGs are drawn from the global seed when they are created
    df = pd.DataFrame(items, columns=["path", "label", "is_valid"])
    dls = block.dataloaders(df, bs=bs, num_workers=num_workers, device=device)
    dls.image_size = size  # read by create_learner for the export metadata
    n_valid = sum(v for _, _, v in items)
    return DataResult(dls=dls, classes=list(dls.vocab), source=name, path=path, skipped=skipped,
                      size=size, n_train=len(items) - n_valid, n_valid=n_valid, split=split)
