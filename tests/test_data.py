"""Data sources, seeded splits, checks on bad data, and offline download paths (loopback HTTP server)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.torch_core import set_seed
from fastai.vision.augment import CropPad, RandomResizedCrop, aug_transforms
from fastai.vision.core import PILImage
from fastai.vision.data import ImageDataLoaders
from PIL import Image, UnidentifiedImageError

from fastlesson.data import (
    CACHE_FORMAT,
    MIN_SCALE,
    SOURCES,
    VAL_XTRA,
    ImageOpener,
    _cache_dir,
    _check,
    _check_sizes,
    _flowers_items,
    _is_small,
    _item_side,
    _prepare,
    _prepare_all,
    _random_split,
    _rename,
    _tfms,
    decode_side,
    default_image_cache,
    flower_names,
    image_problem,
    load_data,
    open_reduced,
    sample_path,
)

SMALL = {"size": 32, "bs": 4}  # px, images per batch: keeps every test a few seconds on CPU


def _jpeg(path: Path, color=(200, 30, 30), size=(40, 32), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, np.uint8) + rng.integers(0, 50, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)
    return path


# --- sources ----------------------------------------------------------------------------------------

def test_sample_is_shipped_small_and_named():
    files = [f for f in sample_path().rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 2_000_000  # bytes
    res = load_data("sample", **SMALL)
    assert res.source == "sample" and len(res.classes) == 10
    assert res.n_train == 160 and res.n_valid == 60 and res.skipped == []
    assert "pink primrose" in res.classes and list(res.dls.vocab) == res.classes
    assert not any(c.isdigit() for c in res.classes)


def test_udacity_layout_uses_names_from_json(image_folder):
    path = image_folder(classes=("1", "17", "102"), n_per_class=4)
    (path / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "17": "purple coneflower",
                                                       "102": "blackberry lily"}))
    res = load_data(path, **SMALL)
    assert res.classes == ["blackberry lily", "pink primrose", "purple coneflower"]
    assert (res.n_train, res.n_valid, res.split) == (12, 6, "valid")
    xb, yb = res.dls.one_batch()
    assert xb.shape == (4, 3, 32, 32)


def test_json_giving_two_folders_one_name_is_an_error(image_folder):
    path = image_folder(classes=("1", "2"), n_per_class=2)
    (path / "cat_to_name.json").write_text(json.dumps({"1": "rose", "2": "rose"}))
    with pytest.raises(ValueError, match="same name 'rose'"):
        load_data(path, **SMALL)


@pytest.mark.parametrize("valid_dir", ["val", "test"])
def test_imagenet_layout_finds_val_or_test(image_folder, valid_dir):
    path = image_folder(n_per_class=4)
    (path / "valid").rename(path / valid_dir)
    res = load_data(path, **SMALL)
    assert res.split == valid_dir and res.n_valid == 6 and res.classes == ["a", "b", "c"]


def test_train_folder_alone_is_split_at_random(image_folder):
    path = image_folder(n_per_class=10)
    for f in (path / "valid").rglob("*.jpg"):
        f.unlink()
    for d in sorted((path / "valid").glob("*")):
        d.rmdir()
    (path / "valid").rmdir()
    res = load_data(path, valid_pct=0.2, **SMALL)
    assert res.split == "random" and (res.n_train, res.n_valid) == (24, 6)


def test_single_folder_split_is_seeded_stratified_and_repeatable(image_folder):
    path = image_folder(layout="flat", n_per_class=10)

    def load(seed):
        res = load_data(path, seed=seed, valid_pct=0.3, **SMALL)
        valid = sorted(str(f) for f in res.dls.valid_ds.items["path"])
        return res, valid, res.dls.one_batch()

    (r1, v1, (x1, y1)), (_, v2, (x2, y2)), (_, v3, _) = load(7), load(7), load(8)
    assert v1 == v2 and v1 != v3  # same seed -> same split; another seed -> another split
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # ... and the same first (augmented) batch
    per_class = r1.dls.valid_ds.items.groupby("label").size().to_dict()
    assert per_class == {"a": 3, "b": 3, "c": 3}  # 30% of 10 in every class


# --- transforms --------------------------------------------------------------------------------------

def test_photos_get_random_resized_crop_and_batch_aug(image_folder):
    res = load_data(image_folder(size=(120, 90)), size=64, bs=4)
    assert any(isinstance(t, RandomResizedCrop) for t in res.dls.after_item.fs)
    tfms = {type(t).__name__: t for t in res.dls.after_batch.fs}
    assert set(tfms) == {"IntToFloatTensor", "Flip", "Brightness"}  # fastai merges the affine ones
    assert len(tfms["Flip"].aff_fs) == 3 and len(tfms["Flip"].coord_fs) == 1  # flip+rotate+zoom, warp
    assert res.dls.one_batch()[0].shape == (4, 3, 64, 64)
    plain = load_data(image_folder("plain", size=(120, 90)), size=64, bs=4, aug=False)
    assert not any(isinstance(t, RandomResizedCrop) for t in plain.dls.after_item.fs)
    assert [type(t).__name__ for t in plain.dls.after_batch.fs] == ["IntToFloatTensor"]


def _framed(path: Path, side: int = 100, border: float = 0.12) -> None:
    """A green square with a red frame `border` of the side wide."""
    a = np.zeros((side, side, 3), np.uint8)
    a[...] = (255, 0, 0)
    b = int(side * border)
    a[b:side - b, b:side - b] = (0, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def test_validation_view_is_a_tighter_centre_crop_than_fastai_default(tmp_path):
    """Validation shows the centre 1/(1+VAL_XTRA) of a photo (71% of the side at 40 px): a frame 12% wide
    is cropped away, while fastai's default val_xtra=0.14 (83%) still shows it."""
    for split in ("train", "valid"):
        for c in ("a", "b"):
            for i in range(2):
                _framed(tmp_path / split / c / f"{i}.png")
    res = load_data(tmp_path, size=40, bs=4)
    (rrc,) = [t for t in res.dls.valid.after_item.fs if isinstance(t, RandomResizedCrop)]
    assert rrc.val_xtra == VAL_XTRA and rrc.min_scale == MIN_SCALE
    img = PILImage.create(tmp_path / "valid" / "a" / "0.png")
    ours = np.asarray(rrc(img, split_idx=1))
    default = np.asarray(RandomResizedCrop(40)(img, split_idx=1))
    assert ours.shape == default.shape == (40, 40, 3)
    red = lambda a: int(((a[..., 0] > 200) & (a[..., 1] < 60)).sum())  # noqa: E731
    assert red(ours) == 0 and red(default) > 0


def test_tiny_images_get_pad_crop_and_flip_not_warps(image_folder):
    res = load_data(image_folder(size=(32, 32), n_per_class=4), size=32, bs=4)
    assert any(isinstance(t, CropPad) for t in res.dls.after_item.fs)
    (flip,) = [t for t in res.dls.after_batch.fs if type(t).__name__ == "Flip"]
    assert len(flip.aff_fs) == 1 and not flip.coord_fs  # flip only: no rotation, zoom or warp on 32 px
    dl = res.dls.valid.new(shuffle=False)
    xb, _ = dl.one_batch()
    raw = [torch.tensor(np.array(res.dls.valid_ds[i][0])).permute(2, 0, 1) / 255 for i in range(4)]
    assert torch.allclose(xb.cpu(), torch.stack(raw), atol=1e-6)  # valid: pad + centre crop = identity
    train = res.dls.train.new(shuffle=False, after_batch=res.dls.valid.after_batch)
    xt, _ = train.one_batch()
    raw_t = torch.stack([torch.tensor(np.array(res.dls.train_ds[i][0])).permute(2, 0, 1) / 255
                         for i in range(4)])
    assert not torch.allclose(xt.cpu(), raw_t, atol=1e-3)  # train: shifted by the random crop


# --- checks on bad data ------------------------------------------------------------------------------

def _corrupt(path: Path) -> dict[str, Path]:
    good = path / "train" / "a" / "img_000.jpg"
    truncated = path / "train" / "a" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = path / "train" / "b" / "empty.jpg"
    empty.write_bytes(b"")
    text = path / "valid" / "c" / "notes.jpg"
    text.write_text("not an image")
    return {"truncated": truncated, "empty": empty, "text": text}


def test_corrupt_images_are_skipped_with_reasons(image_folder):
    path = image_folder(n_per_class=4)
    bad = _corrupt(path)
    loose = _jpeg(path / "train" / "loose.jpg")
    res = load_data(path, **SMALL)
    reasons = dict(res.skipped)
    assert set(reasons) == {*bad.values(), loose}
    assert reasons[bad["empty"]] == "empty file"
    assert "unreadable image" in reasons[bad["truncated"]] and "unreadable image" in reasons[bad["text"]]
    assert "class folder" in reasons[loose]
    assert (res.n_train, res.n_valid) == (12, 6)
    n = sum(len(yb) for _, yb in res.dls.train) + sum(len(yb) for _, yb in res.dls.valid)
    assert n == 12 // 4 * 4 + 6  # a whole epoch runs (train drops the last partial batch)


def test_plain_fastai_crashes_mid_epoch_on_the_same_folder(image_folder):
    path = image_folder(n_per_class=4)
    _corrupt(path)
    dls = ImageDataLoaders.from_folder(path, valid="valid", item_tfms=None, bs=4, num_workers=0)
    with pytest.raises(UnidentifiedImageError, match="cannot identify image file .*notes.jpg"):
        for _ in dls.valid:  # the text file in valid/c: PIL cannot open it, fastai does not catch it
            pass


def test_image_problem_accepts_a_good_image(tmp_path):
    assert image_problem(_jpeg(tmp_path / "ok.jpg")) is None


def test_class_with_too_few_images_is_named(image_folder):
    path = image_folder(n_per_class=4)
    for f in sorted((path / "train" / "b").glob("*.jpg"))[1:]:
        f.unlink()
    with pytest.raises(ValueError, match=r"'b' \(1\)"):
        load_data(path, **SMALL)


def test_empty_validation_split_is_named(image_folder):
    path = image_folder(n_per_class=4)
    for f in (path / "valid").rglob("*.jpg"):
        f.unlink()
    with pytest.raises(ValueError, match=f"validation split.*{path / 'valid'}"):
        load_data(path, **SMALL)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_data(tmp_path / "nowhere", **SMALL)
    assert "sample" in SOURCES


@pytest.mark.parametrize("kw", [{"size": 0}, {"bs": 0}, {"valid_pct": 1.5}])
def test_bad_arguments_are_value_errors(image_folder, kw):
    path = image_folder(layout="flat", n_per_class=4)
    with pytest.raises(ValueError, match=next(iter(kw))):
        load_data(path, **{**SMALL, **kw})


# --- big photos: decoded at reduced scale, once, into a content-keyed cache --------------------------

BIG = (1200, 900)  # px; size=64 needs decode_side(64) = 80 px, so these are "big" (>= 2 x 80 on the short side)
REDUCED = (107, 80)  # 1200x900 with its short side at 80 px


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth photo-like image: a random 8x6 colour field, upscaled."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BICUBIC)


def _big_folder(root: Path, size=BIG, fmt="JPEG", n_train=4, n_valid=2) -> Path:
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for split, n in (("train", n_train), ("valid", n_valid)):
        for ci, cls in enumerate(("a", "b")):
            for i in range(n):
                f = root / split / cls / f"{i}.{ext}"
                f.parent.mkdir(parents=True, exist_ok=True)
                img = _photo(*size, seed=ci * 100 + i + (50 if split == "valid" else 0))
                img.save(f, quality=95) if fmt == "JPEG" else img.save(f)
    return root


def _pre_resized(big: Path, root: Path) -> Path:
    """What a person would do by hand: full decode, resize to short side 80 px, save losslessly."""
    for f in sorted(big.rglob("*.*")):
        out = root / f.relative_to(big).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").resize(REDUCED, Image.Resampling.LANCZOS).save(out)
    return root


def _epoch(res, seed=0):
    """Every batch of one shuffled training epoch and of the validation set, as [0, 1] tensors."""
    set_seed(seed)
    res.dls.train.rng.seed(seed)  # the loader's own shuffle RNG, drawn once when it was made
    train = [(x.cpu().clone(), y.cpu().clone()) for x, y in res.dls.train]
    valid = [(x.cpu().clone(), y.cpu().clone()) for x, y in res.dls.valid]
    return train + valid


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory):
    return _big_folder(tmp_path_factory.mktemp("big") / "photos")


BIG_KW = {"size": 64, "bs": 4, "seed": 3}


def test_big_photos_give_the_batches_of_pre_resized_copies(big_jpegs, tmp_path):
    big = load_data(big_jpegs, image_cache=tmp_path / "cache", **BIG_KW)
    assert big.decode_side == 80 == decode_side(64) and big.n_cached == 12
    pre = load_data(_pre_resized(big_jpegs, tmp_path / "pre"), image_cache=tmp_path / "cache2", **BIG_KW)
    assert pre.n_cached == 0 and pre.image_cache is None  # already small: nothing to cache
    a, b = _epoch(big), _epoch(pre)
    assert len(a) == len(b) == 2 + 1  # 8 train images in batches of 4, 4 valid images
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == xb.shape and xa.shape[1:] == (3, 64, 64)
        assert torch.equal(ya, yb)
        assert (xa - xb).abs().mean() < 2 / 255  # the decoder's reduced scale vs a full decode, then resize
    # and not the same by accident: another seed draws other crops
    assert (_epoch(big, seed=1)[0][0] - a[0][0]).abs().mean() > 10 / 255


def test_second_load_reads_the_cache_without_decoding(big_jpegs, tmp_path, monkeypatch):
    first = _epoch(load_data(big_jpegs, image_cache=tmp_path, **BIG_KW))
    copies = sorted(tmp_path.rglob("*.bmp"))
    assert len(copies) == 12 and not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    assert all(Image.open(c).size in (REDUCED, REDUCED[::-1]) for c in copies)

    def no_decode(*a, **k):
        raise AssertionError("decoded a big photo again")

    monkeypatch.setattr("fastlesson.data.open_reduced", no_decode)
    again = load_data(big_jpegs, image_cache=tmp_path, **BIG_KW)
    assert again.n_cached == 12 and again.image_cache == tmp_path
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, _epoch(again)))


def test_cache_is_safe_to_delete_and_optional(big_jpegs, tmp_path):
    cached = load_data(big_jpegs, image_cache=tmp_path / "c", **BIG_KW)
    want = _epoch(cached)
    shutil.rmtree(tmp_path / "c")  # mid-run: the opener decodes the originals to the same pixels
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(want, _epoch(cached)))
    off = load_data(big_jpegs, image_cache=False, **BIG_KW)
    assert off.n_cached == 0 and not (tmp_path / "c").exists()
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(want, _epoch(off)))


def test_cache_is_keyed_by_content_not_name(tmp_path):
    root = _big_folder(tmp_path / "p", n_train=2, n_valid=1)
    load_data(root, image_cache=tmp_path / "c", **BIG_KW)
    before = {c.name for c in (tmp_path / "c").rglob("*.bmp")}
    (root / "train" / "a" / "0.jpg").rename(root / "train" / "a" / "renamed.jpg")  # same bytes: a hit
    _photo(*BIG, seed=999).save(root / "train" / "b" / "0.jpg", quality=95)  # new bytes, same name: a miss
    res = load_data(root, image_cache=tmp_path / "c", **BIG_KW)
    after = {c.name for c in (tmp_path / "c").rglob("*.bmp")}
    assert res.n_cached == 6 and len(before) == 6 and len(after - before) == 1
    assert all(n.endswith(f"-{res.decode_side}px-{CACHE_FORMAT}.bmp") for n in after)  # keyed by target size too


@pytest.mark.parametrize("w,h", [(4000, 3000), (1000, 750), (401, 300), (250, 199), (150, 100), (90, 160)])
def test_opener_never_goes_below_decode_side(tmp_path, w, h):
    f = tmp_path / "p.jpg"
    _photo(w, h, seed=0).save(f, quality=90)
    img = ImageOpener(200)(f)
    assert isinstance(img, PILImage)
    assert min(img.size) == min(200, w, h)  # reduced to 200 px, never below; small photos as they are
    assert img.size[0] / img.size[1] == pytest.approx(w / h, rel=0.02)


def test_opener_applies_exif_rotation_which_fastai_ignores(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer rotates the stored pixels 90 degrees clockwise: a portrait photo
    _photo(1200, 900, seed=1).save(tmp_path / "r.jpg", quality=95, exif=exif)
    assert ImageOpener(80)(tmp_path / "r.jpg").size == (80, 107)
    assert PILImage.create(tmp_path / "r.jpg").size == (1200, 900)  # fastai trains on it sideways


def test_big_pngs_are_cached_too_and_small_ones_are_not(tmp_path):
    res = load_data(_big_folder(tmp_path / "png", fmt="PNG", n_train=2, n_valid=1), image_cache=tmp_path / "c",
                    **BIG_KW)
    assert res.n_cached == 6 and res.dls.one_batch()[0].shape == (4, 3, 64, 64)
    small = load_data(_big_folder(tmp_path / "small", size=(150, 100), fmt="PNG", n_train=2, n_valid=1),
                      image_cache=tmp_path / "c2", **BIG_KW)
    assert small.n_cached == 0 and not (tmp_path / "c2").exists()
    assert small.dls.one_batch()[0].shape == (4, 3, 64, 64)


def test_broken_big_photo_is_skipped_with_a_reason(tmp_path):
    root = _big_folder(tmp_path / "p", n_train=3, n_valid=1)
    good = root / "train" / "a" / "0.jpg"
    broken = root / "train" / "a" / "broken.jpg"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # header says 1200x900, data cut
    res = load_data(root, image_cache=tmp_path / "c", **BIG_KW)
    assert list(dict(res.skipped)) == [broken] and "unreadable image" in dict(res.skipped)[broken]
    assert res.n_cached == 8


def test_bad_image_cache_is_a_value_error(image_folder):
    with pytest.raises(ValueError, match="image_cache=3"):
        load_data(image_folder(n_per_class=4), image_cache=3, **SMALL)


# --- downloads, offline: archives of the real layouts served from 127.0.0.1 --------------------------

@contextlib.contextmanager
def serve(folder: Path):
    """Serve `folder` over HTTP on a free loopback port; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _tgz(src: Path, archive: Path) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return archive


def _flowers_archive(tmp_path: Path) -> Path:
    """oxford-102-flowers.tgz as fastai ships it: jpg/ plus 'jpg/image_NNNNN.jpg LABEL' files, 0-based."""
    root = tmp_path / "src" / "oxford-102-flowers"
    lines = {"train.txt": [], "valid.txt": [], "test.txt": []}
    n = 0
    for label, color in ((0, (200, 20, 20)), (16, (20, 200, 20)), (101, (20, 20, 200))):
        for split, count in (("train.txt", 3), ("valid.txt", 2), ("test.txt", 2)):
            for _ in range(count):
                n += 1
                _jpeg(root / "jpg" / f"image_{n:05d}.jpg", color, seed=n)
                lines[split].append(f"jpg/image_{n:05d}.jpg {label}")
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")
    return _tgz(root, tmp_path / "www" / "oxford-102-flowers.tgz")


def test_flowers_downloads_and_names_archive_labels(tmp_path):
    archive = _flowers_archive(tmp_path)
    base = tmp_path / "fastai"
    with serve(archive.parent) as url:
        res = load_data("flowers", url=f"{url}/{archive.name}", download_base=base, **SMALL)
    names = flower_names()
    # archive label 0 -> class 1, 16 -> 17, 101 -> 102 (Udacity folder numbers, cat_to_name.json keys)
    assert res.classes == sorted([names["1"], names["17"], names["102"]])
    assert names["17"] == "purple coneflower"
    assert (res.n_train, res.n_valid) == (9, 6)  # test.txt is kept out of training and validation
    assert res.path == base / "data" / "oxford-102-flowers"
    by_class = res.dls.train_ds.items.groupby("label")["path"].apply(lambda p: sorted(Path(x).name for x in p))
    assert by_class[names["17"]] == ["image_00008.jpg", "image_00009.jpg", "image_00010.jpg"]
    # second call: served from the local cache, the server is gone
    again = load_data("flowers", url=f"{url}/{archive.name}", download_base=base, **SMALL)
    assert again.classes == res.classes


def _cifar_archive(tmp_path: Path, name: str, nested: bool) -> Path:
    root = tmp_path / "src" / name
    fine = {"vehicles": ["bus", "truck"], "animals": ["cat", "dog"]}
    for split, count in (("train", 3), ("test", 2)):
        for i, (coarse, classes) in enumerate(fine.items()):
            for j, cls in enumerate(classes):
                d = root / split / coarse / cls if nested else root / split / cls
                for k in range(count):
                    d.mkdir(parents=True, exist_ok=True)
                    rgb = np.full((32, 32, 3), 40 + 60 * (2 * i + j), np.uint8)
                    Image.fromarray(rgb).save(d / f"{k}_{cls}.png")
    (root / "labels.txt").write_text("\n".join(c for cs in fine.values() for c in cs) + "\n")
    return _tgz(root, tmp_path / "www" / f"{name}.tgz")


@pytest.mark.parametrize("name,nested", [("cifar10", False), ("cifar100", True)])
def test_cifar_downloads_use_test_as_valid_and_small_image_tfms(tmp_path, name, nested):
    archive = _cifar_archive(tmp_path, name, nested)
    with serve(archive.parent) as url:
        res = load_data(name, url=f"{url}/{archive.name}", download_base=tmp_path / "fastai", bs=4, size=32)
    assert res.classes == ["bus", "cat", "dog", "truck"]  # fine labels, also under coarse folders
    assert (res.split, res.n_train, res.n_valid) == ("test", 12, 8)
    assert any(isinstance(t, CropPad) for t in res.dls.after_item.fs)
    assert res.dls.one_batch()[0].shape == (4, 3, 32, 32)


def test_offline_download_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a loopback port with nobody listening: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FileNotFoundError, match="--data sample"):
        load_data("cifar10", url=f"http://127.0.0.1:{port}/cifar10.tgz", download_base=tmp_path, **SMALL)


# --- each helper's branches and boundaries, on made-up inputs (no loaders: these run once per mutant) ---

def test_decode_side_is_fastais_validation_resize():
    """decode_side(size) == the side fastai's RandomResizedCrop resizes to before its validation centre crop."""
    img = PILImage.create(np.zeros((30, 40, 3), np.uint8))
    for size in range(8, 400):
        for xtra in (VAL_XTRA, 0.14):
            rrc = RandomResizedCrop(size, val_xtra=xtra)
            rrc.before_call(img, split_idx=1)
            assert rrc.final_size == (decode_side(size, xtra),) * 2, (size, xtra)


def test_default_image_cache_prefers_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLESSON_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_image_cache() == tmp_path / "env" / "images"
    monkeypatch.setenv("FASTLESSON_CACHE", "")  # set but empty: as if unset
    assert default_image_cache() == tmp_path / "xdg" / "fastlesson" / "images"
    monkeypatch.delenv("FASTLESSON_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_image_cache() == tmp_path / "home" / ".cache" / "fastlesson" / "images"


def test_opener_reads_the_cached_copy_and_falls_back_to_the_original(tmp_path):
    orig, copy = tmp_path / "photo.png", tmp_path / "copy.png"
    _photo(300, 200, seed=0).save(orig)
    Image.new("RGB", (150, 100), (1, 2, 3)).save(copy)  # a copy that is recognisably not the photo
    opener = ImageOpener(100, {str(orig): str(copy)})
    assert opener(orig).size == (150, 100) and opener(orig).getpixel((5, 5)) == (1, 2, 3)
    want = np.asarray(open_reduced(orig, 100))
    assert want.shape == (100, 150, 3)
    copy.write_bytes(b"damaged")  # a damaged copy: the original is decoded instead
    assert np.array_equal(np.asarray(opener(orig)), want)
    copy.unlink()  # a deleted copy: the same
    assert np.array_equal(np.asarray(opener(orig)), want)
    assert np.array_equal(np.asarray(ImageOpener(100)(str(orig))), want)  # str paths too, no cache


def test_opener_passes_arrays_and_images_to_fastai(tmp_path):
    arr = np.zeros((5, 600, 3), np.uint8)
    arr[..., 1] = 77
    img = ImageOpener(2)(arr)  # not a path: fastai's own conversion, never reduced
    assert isinstance(img, PILImage) and img.size == (600, 5) and img.getpixel((0, 0)) == (0, 77, 0)


def _items(root: Path, counts: dict[str, int]) -> list:
    out = []
    for cls, n in counts.items():
        for i in range(n):
            out.append((_jpeg(root / cls / f"{i:02d}.jpg", size=(8, 8), seed=i), cls, False))
    return out


def test_random_split_counts_per_class_and_spares_tiny_classes(tmp_path):
    items = _items(tmp_path, {"two": 2, "three": 3, "ten": 10})
    split = _random_split(items, 0.3, seed=0)
    assert sorted(f for f, _, _ in split) == sorted(f for f, _, _ in items)  # every item, its own label
    assert all(f.parent.name == lbl for f, lbl, _ in split)
    valid = {lbl: sum(v for _, l2, v in split if l2 == lbl) for lbl in ("two", "three", "ten")}
    # round(2 * 0.3): a class of MIN_TRAIN_PER_CLASS images keeps them all; round(0.9) = 1; round(3.0) = 3
    assert valid == {"two": 0, "three": 1, "ten": 3}
    picks = {tuple(f.name for f, lbl, v in _random_split(items, 0.3, seed=s) if v and lbl == "ten")
             for s in range(6)}
    assert len(picks) > 1  # the seed picks which images


@pytest.mark.parametrize("pct", [0, 1, -0.2, 1.0])
def test_random_split_needs_a_fraction_strictly_between_0_and_1(tmp_path, pct):
    with pytest.raises(ValueError, match=f"valid_pct={pct!r}"):
        _random_split(_items(tmp_path, {"a": 3}), pct, seed=0)


@pytest.mark.parametrize("size, bs, bad", [(7, 4, "size=7"), (8.0, 4, "size=8.0"), ("32", 4, "size='32'"),
                                           (8, 0, "bs=0"), (8, 2.0, "bs=2.0"), (8, -1, "bs=-1")])
def test_sizes_are_checked_at_their_bounds(size, bs, bad):
    _check_sizes(8, 1)  # the smallest accepted: an 8-px side, one image a batch
    with pytest.raises(ValueError, match=re.escape(bad)):
        _check_sizes(size, bs)


def test_is_small_reads_the_first_image_that_opens(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    edge, over = tmp_path / "edge.png", tmp_path / "over.png"
    Image.new("RGB", (64, 10)).save(edge)  # the longest side decides: 64 px is CIFAR-sized, 65 is not
    Image.new("RGB", (65, 10)).save(over)
    assert _is_small([(bad, "a", False), (edge, "a", False), (over, "a", False)])
    assert not _is_small([(bad, "a", False), (over, "a", False), (edge, "a", False)])
    assert not _is_small([(bad, "a", False)]) and not _is_small([])


@pytest.mark.parametrize("size, item_size, aug, small, side", [
    (32, None, True, True, 32), (32, 64, True, True, 32),  # tiny images: opened at the crop size
    (64, None, True, False, 80), (64, 96, True, False, 96 + 24),  # photos, augmented: the validation resize
    (64, None, False, False, 64), (64, 96, False, False, 96),  # not augmented: the item resize
])
def test_item_side_is_what_the_item_transforms_need(size, item_size, aug, small, side):
    assert _item_side(size, item_size, aug, small) == side


@pytest.mark.parametrize("size, pad", [(8, 10), (15, 17), (16, 20), (32, 40)])
def test_tiny_images_are_padded_by_an_eighth_on_each_side(size, pad):
    item, batch = _tfms(size, None, True, True)
    assert [type(t).__name__ for t in item] == ["Resize", "CropPad", "RandomCrop"]
    assert tuple(item[1].size) == (pad, pad) and tuple(item[2].size) == (size, size)
    assert [t.order for t in item[1:]] == [2, 3] and [type(t).__name__ for t in batch] == ["Flip"]
    a = np.zeros((size, size, 3), np.uint8)
    a[:, :, 0], a[0, :, 1] = 200, 90  # a red image whose top row is also green
    padded = np.asarray(item[1](PILImage.create(a), split_idx=0))
    assert padded.shape == (pad, pad, 3) and (padded[..., 0] == 200).all()  # reflected: no black frame
    assert (padded[(pad - size) // 2, :, 1] == 90).all() and padded[(pad - size) // 2 - 1, :, 1].max() == 0
    item, batch = _tfms(size, None, False, True)
    assert [type(t).__name__ for t in item] == ["Resize"] and batch == []


def test_photo_tfms_resize_twice_only_when_item_size_differs():
    item, batch = _tfms(64, 96, False, False)
    assert tuple(item[0].size) == (96, 96) and [tuple(t.size) for t in batch] == [(64, 64)]
    item, batch = _tfms(64, 64, False, False)
    assert tuple(item[0].size) == (64, 64) and batch == []
    item, batch = _tfms(64, None, False, False)
    assert tuple(item[0].size) == (64, 64) and batch == []
    (rrc,), batch = _tfms(64, 96, True, False)
    assert tuple(rrc.size) == (96, 96) and (rrc.min_scale, rrc.val_xtra) == (MIN_SCALE, VAL_XTRA)
    assert {type(t).__name__ for t in batch} == {type(t).__name__ for t in aug_transforms(size=64)}
    assert [t.size for t in batch if hasattr(t, "size")] == [t.size for t in aug_transforms(size=64)
                                                            if hasattr(t, "size")]


def test_cache_dir_choices(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLESSON_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _cache_dir(True, small=False) == tmp_path / "env" / "images"
    assert _cache_dir(str(tmp_path / "c"), small=False) == tmp_path / "c"
    assert _cache_dir("~/c", small=False) == tmp_path / "home" / "c"
    assert _cache_dir(Path("~/p"), small=False) == tmp_path / "home" / "p"
    for off in (False, None):
        assert _cache_dir(off, small=False) is None
    assert _cache_dir(True, small=True) is None and _cache_dir(tmp_path, small=True) is None  # CIFAR-sized
    with pytest.raises(ValueError, match="image_cache=1.5"):
        _cache_dir(1.5, small=False)


def test_prepare_caches_from_twice_the_decode_side(tmp_path):
    edge, under = tmp_path / "edge.png", tmp_path / "under.png"
    _photo(240, 160, seed=0).save(edge)  # short side 160 = 2 x 80: cached
    _photo(240, 159, seed=0).save(under)
    problem, copy = _prepare(edge, 80, tmp_path / "c", check=True)
    assert problem is None and copy.is_file() and Image.open(copy).size == (120, 80)
    assert copy.parent.parent == tmp_path / "c" and copy.name.endswith(f"-80px-{CACHE_FORMAT}.bmp")
    assert copy.parent.name == copy.name[:2] and len(copy.name.split("-")[0]) == 32  # 16-byte digest
    assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(open_reduced(edge, 80)))
    assert _prepare(under, 80, tmp_path / "c", check=True) == (None, None)
    assert _prepare(edge, 80, None, check=True) == (None, None)  # no cache: checked only


def test_prepare_reports_broken_images_only_when_checking(tmp_path):
    good = tmp_path / "good.jpg"
    _photo(400, 300, seed=0).save(good, quality=90)
    cut, empty, text = tmp_path / "cut.jpg", tmp_path / "empty.jpg", tmp_path / "text.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty.write_bytes(b"")
    text.write_text("not an image")
    for cache in (tmp_path / "c", None):
        problem, copy = _prepare(cut, 80, cache, check=True)
        assert "unreadable image" in problem and copy is None
        assert _prepare(empty, 80, cache, check=True) == ("empty file", None)
        assert "unreadable image" in _prepare(text, 80, cache, check=True)[0]
        for f in (cut, empty, text):
            assert _prepare(f, 80, cache, check=False) == (None, None)
    assert not list(tmp_path.rglob("*.bmp"))  # nothing cached from a broken photo


def test_prepare_all_keeps_order_and_skips_with_reasons(tmp_path):
    items = _items(tmp_path, {"a": 3})
    items[1][0].write_bytes(b"")
    skipped = []
    good, cached = _prepare_all(items, 80, None, True, skipped)
    assert good == [items[0], items[2]] and cached == {} and skipped == [(items[1][0], "empty file")]
    skipped = []
    assert _prepare_all(items, 80, None, False, skipped) == (items, {}) and skipped == []  # nothing checked


def _flowers_folder(root: Path, train: str, valid: str | None) -> Path:
    for n in (1, 2, 3):
        _jpeg(root / "jpg" / f"image_{n:05d}.jpg", size=(8, 8), seed=n)
    (root / "train.txt").write_text(train)
    if valid is not None:
        (root / "valid.txt").write_text(valid)
    return root


def test_flowers_label_files_skip_blank_lines_and_missing_images(tmp_path):
    root = _flowers_folder(tmp_path / "f", "jpg/image_00001.jpg 0\n\n  \njpg/image_00009.jpg 3\n"
                                           "jpg/image_00002.jpg 101", "jpg/image_00003.jpg 16\n")
    skipped = []
    items, split = _flowers_items(root, skipped)
    names = flower_names()
    assert split == "train.txt/valid.txt"
    assert items == [(root / "jpg" / "image_00001.jpg", names["1"], False),
                     (root / "jpg" / "image_00002.jpg", names["102"], False),
                     (root / "jpg" / "image_00003.jpg", names["17"], True)]
    assert skipped == [(root / "jpg" / "image_00009.jpg", "listed in train.txt but missing")]


def test_flowers_archive_without_a_label_file_is_named(tmp_path):
    root = _flowers_folder(tmp_path / "f", "jpg/image_00001.jpg 0\n", None)
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "valid.txt"))):
        _flowers_items(root, [])


def test_folders_missing_from_the_json_keep_their_folder_name(tmp_path):
    items = [(tmp_path / "1" / "x.jpg", "1", False), (tmp_path / "2" / "y.jpg", "2", True)]
    assert _rename(items, {"1": "rose"}, tmp_path / "cat_to_name.json") == \
        [(tmp_path / "1" / "x.jpg", "rose", False), (tmp_path / "2" / "y.jpg", "2", True)]
    with pytest.raises(ValueError, match="'1' and '2'"):
        _rename(items, {"1": "2"}, tmp_path / "cat_to_name.json")  # a name that is another folder's


def test_check_counts_training_images_per_class(tmp_path):
    ok = [(tmp_path / f"{i}", c, v) for i, (c, v) in enumerate([("a", False), ("a", False), ("b", False),
                                                                 ("b", False), ("a", True)])]
    assert _check(ok, tmp_path, "valid") == ok  # b needs no validation image; 2 training images suffice
    one = ok[1:]
    with pytest.raises(ValueError, match=r"'a' \(1\)") as err:
        _check(one + [(tmp_path / "v", "a", True)], tmp_path, "valid")
    assert "'b'" not in str(err.value)
    for split, where in (("valid", tmp_path / "train"), ("random", tmp_path)):  # where to add images
        with pytest.raises(ValueError, match="No readable training images") as err:
            _check([(tmp_path / "v", "a", True)], tmp_path, split)
        assert str(err.value).endswith(f"under {where}")
    for split in ("train.txt/valid.txt", "random"):  # a label file or a random split, not a folder
        with pytest.raises(ValueError, match=re.escape(f"is empty ({tmp_path})")):
            _check(ok[:4], tmp_path, split)
    with pytest.raises(ValueError, match=re.escape(f"is empty ({tmp_path / 'val'})")):
        _check(ok[:4], tmp_path, "val")
