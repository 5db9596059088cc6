"""One epoch on big camera-size photos vs the same photos pre-resized: fastai as it stands vs fastlesson.

    python bench/decode.py                        # 10 classes x (8 train + 4 valid) 12-MP photos, ~5 min
    python bench/decode.py --classes 2 --train 2 --valid 1 --train-batches 1 --bs 4   # quick check

The big photos are made from the development set (flowers102-small: first --classes classes, first
--train / --valid images of each): upscaled to 4000x3000 (or 3000x4000), film grain of --grain levels
added so the files are as large as a phone's (~4 MB; a smooth upscale compresses to ~1 MB and decodes
faster than a real photo), saved as JPEG quality 95 under bench/.cache/decode/ (git-ignored; made once,
reused). The pre-resized copies are the same photos resized to the short side the pipeline needs
(fastlesson.data.decode_side, 200 px for 160 px crops), JPEG quality 95.

For each folder and each pipeline, one data epoch (every training batch with augmentation, then every
validation batch) and one short training epoch (--train-batches batches of lite0 frozen to the head:
forward, backward, optimizer step; BatchNorm trains, as after fastai's freeze) are timed:
- fastai as it stands: DataBlock(ImageBlock) -> PILImage.create decodes every full-size JPEG each epoch,
  with the same item and batch transforms as fastlesson (RandomResizedCrop, aug_transforms).
- fastlesson: load_data -> big photos decoded once at reduced scale (JPEG draft) into a content-keyed
  cache of reduced copies, made inside load_data (timed separately: the one-off cost, cold and warm).
Target (issue 15): a fastlesson epoch on big photos costs <= 1.2x the epoch on the pre-resized copies.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import ARCH, DEFAULT_DATA, REPO, env_summary, resolve_data  # noqa: E402

CACHE = REPO / "bench" / ".cache" / "decode"  # git-ignored
BIG = (4000, 3000)  # px, a 12-megapixel camera photo (portrait sources become 3000x4000)
QUALITY = 95  # JPEG quality of the big photos and of the pre-resized copies


# ---------------------------------------------------------------- the two folders

def _class_dirs(src: Path, n_classes: int) -> list[str]:
    names = sorted((p.name for p in (src / "train").iterdir() if p.is_dir()),
                   key=lambda n: (int(n) if n.isdigit() else 10**9, n))
    return names[:n_classes]


def _sources(src: Path, n_classes: int, n_train: int, n_valid: int) -> list[tuple[Path, Path]]:
    """(source image, relative output path) for the chosen classes and images."""
    out = []
    for cls in _class_dirs(src, n_classes):
        for split, n in (("train", n_train), ("valid", n_valid)):
            for f in sorted((src / split / cls).iterdir())[:n]:
                out.append((f, Path(split) / cls / f"{f.stem}.jpg"))
    return out


def _make_big(src: Path, dst: Path, grain: float, seed: int) -> None:
    import numpy as np
    from PIL import Image

    from fastlesson._io import atomic_write

    if dst.is_file():
        return
    img = Image.open(src).convert("RGB")
    size = BIG if img.width >= img.height else BIG[::-1]
    big = img.resize(size, Image.Resampling.BICUBIC)
    if grain > 0:
        rng = np.random.default_rng(seed)
        a = np.asarray(big, np.int16) + rng.normal(0, grain, (size[1], size[0], 1)).astype(np.int16)
        big = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    atomic_write(dst, lambda p: big.save(p, format="JPEG", quality=QUALITY))


def _make_small(big: Path, dst: Path, side: int) -> None:
    from PIL import Image

    from fastlesson._io import atomic_write
    from fastlesson.images import reduced_size

    if dst.is_file():
        return
    img = Image.open(big).convert("RGB")
    small = img.resize(reduced_size(img.size, side), Image.Resampling.LANCZOS)
    atomic_write(dst, lambda p: small.save(p, format="JPEG", quality=QUALITY))


def make_folders(src: Path, a, side: int) -> tuple[Path, Path]:
    """(big photos, pre-resized copies), made once under CACHE and reused (delete the folder to redo)."""
    tag = f"{a.classes}c-{a.train}t-{a.valid}v-grain{a.grain:g}"
    big_dir, small_dir = CACHE / f"big-{tag}", CACHE / f"resized{side}-{tag}"
    todo = _sources(src, a.classes, a.train, a.valid)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:  # PIL encodes with the GIL released
        list(pool.map(lambda it: _make_big(it[1][0], big_dir / it[1][1], a.grain, it[0]), enumerate(todo)))
        list(pool.map(lambda it: _make_small(big_dir / it[1], small_dir / it[1], side), todo))
    if (src / "cat_to_name.json").is_file():
        for d in (big_dir, small_dir):
            shutil.copyfile(src / "cat_to_name.json", d / "cat_to_name.json")
    print(f"photos: {len(todo)} from {src} -> {big_dir} ({_mb(big_dir):.1f} MB per photo) and {small_dir} "
          f"({_mb(small_dir) * 1000:.0f} KB per photo) in {time.perf_counter() - t0:.0f} s (reused if there)",
          flush=True)
    return big_dir, small_dir


def _mb(folder: Path) -> float:
    files = list(folder.rglob("*.jpg"))
    return sum(f.stat().st_size for f in files) / max(1, len(files)) / 1e6


# ---------------------------------------------------------------- the two pipelines

def fastai_dls(folder: Path, size: int, bs: int, seed: int):
    """fastai as it stands: PILImage.create opens every full-size file, fastlesson's transforms after it."""
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import GrandparentSplitter, get_image_files, parent_label
    from fastai.torch_core import set_seed
    from fastai.vision.data import ImageBlock

    from fastlesson.data import _tfms

    item_tfms, batch_tfms = _tfms(size, None, aug=True, small=False)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=GrandparentSplitter(train_name="train", valid_name="valid"),
                      item_tfms=item_tfms, batch_tfms=batch_tfms)
    set_seed(seed)
    return block.dataloaders(folder, bs=bs, num_workers=0)


def fastlesson_dls(folder: Path, size: int, bs: int, seed: int, cache: Path):
    from fastlesson.data import load_data

    return load_data(folder, size=size, bs=bs, seed=seed, image_cache=cache)


def data_epoch(dls) -> tuple[float, int]:
    """Seconds and images for every training batch (augmented) and every validation batch."""
    t0, n = time.perf_counter(), 0
    for dl in (dls.train, dls.valid):
        for xb, _ in dl:
            n += len(xb)
    return time.perf_counter() - t0, n


def train_epoch(dls, n_batches: int) -> tuple[float, int]:
    """Seconds and images for `n_batches` training batches of lite0 frozen to the head (data included)."""
    import torch

    from fastlesson.models import create_learner

    learn = create_learner(dls, ARCH, pretrained=True)
    learn.create_opt()
    learn.model.train()
    xb, yb = dls.one_batch()  # warm-up step, not timed: first-call allocations and kernel choices
    learn.loss_func(learn.model(xb), yb).backward()
    learn.opt.zero_grad()
    t0, n = time.perf_counter(), 0
    for i, (xb, yb) in enumerate(dls.train):
        if i == n_batches:
            break
        loss = learn.loss_func(learn.model(xb), yb)
        loss.backward()
        learn.opt.step()
        learn.opt.zero_grad()
        n += len(xb)
    assert torch.isfinite(loss)
    return time.perf_counter() - t0, n


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"Udacity-layout folder to make the photos from [{DEFAULT_DATA}]")
    p.add_argument("--classes", type=int, default=10, help="classes taken (the first, by number) [10]")
    p.add_argument("--train", type=int, default=8, help="training photos per class [8]")
    p.add_argument("--valid", type=int, default=4, help="validation photos per class [4]")
    p.add_argument("--grain", type=float, default=6.0, help="film grain, std in 0-255 levels (0: none) [6]")
    p.add_argument("--size", type=int, default=160, help="input side in px (the recipe's) [160]")
    p.add_argument("--bs", type=int, default=32, help="batch size (the recipe's) [32]")
    p.add_argument("--train-batches", type=int, default=2, help="batches in the timed training epoch [2]")
    p.add_argument("--repeats", type=int, default=1, help="timed epochs per cell; the fastest is shown [1]")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)

    import torch

    from fastlesson.data import decode_side

    if a.threads:
        torch.set_num_threads(a.threads)
    side = decode_side(a.size)
    big, small = make_folders(resolve_data(a.data), a, side)
    reduced = CACHE / "reduced-copies"  # fastlesson's image_cache for this bench, emptied for the cold run
    shutil.rmtree(reduced, ignore_errors=True)

    rows, setup = {}, {}
    for folder_name, folder in (("big", big), ("pre-resized", small)):
        for pipe in ("fastai", "fastlesson"):
            t0 = time.perf_counter()
            if pipe == "fastai":
                dls = fastai_dls(folder, a.size, a.bs, a.seed)
            else:
                dls = fastlesson_dls(folder, a.size, a.bs, a.seed, reduced).dls
            setup[(folder_name, pipe)] = time.perf_counter() - t0
            if pipe == "fastlesson":  # again, warm: what every later run on the same photos pays
                t0 = time.perf_counter()
                res = fastlesson_dls(folder, a.size, a.bs, a.seed, reduced)
                dls = res.dls
                setup[(folder_name, pipe + " warm")] = time.perf_counter() - t0
            d_s, d_n = min(data_epoch(dls) for _ in range(a.repeats))
            t_s, t_n = min(train_epoch(dls, a.train_batches) for _ in range(a.repeats))
            rows[(folder_name, pipe)] = (d_s, d_n, t_s, t_n)
            print(f"  {folder_name:12s} {pipe:10s} setup {setup[(folder_name, pipe)]:6.1f} s, data epoch "
                  f"{d_s:6.1f} s ({d_n} images), training {t_s:6.1f} s ({t_n} images)", flush=True)

    print("\n" + env_summary(repeats=a.repeats))
    print(f"photos: {big} (made from {a.data}, upscaled to {BIG[0]}x{BIG[1]}, grain {a.grain:g}, JPEG q{QUALITY}, "
          f"{_mb(big):.1f} MB each) vs {small} (short side {side} px); {a.size} px crops, bs {a.bs}, arch {ARCH}")
    print("\n| pipeline | photos | setup (s) | data epoch (s) | ms / image | training, "
          f"{a.train_batches} batches (s) | ms / image |\n|---|---|---|---|---|---|---|")
    for (folder_name, pipe), (d_s, d_n, t_s, t_n) in rows.items():
        warm = setup.get((folder_name, pipe + " warm"))
        setup_txt = f"{setup[(folder_name, pipe)]:.1f}" + (f" (warm {warm:.1f})" if warm is not None else "")
        print(f"| {pipe} | {folder_name} | {setup_txt} | {d_s:.1f} | {1000 * d_s / d_n:.1f} | {t_s:.1f} | "
              f"{1000 * t_s / max(1, t_n):.0f} |")

    def ratio(pipe: str, col: int) -> float:
        return rows[("big", pipe)][col] / rows[("pre-resized", pipe)][col]

    once = setup[("big", "fastlesson")] - setup[("big", "fastlesson warm")]
    print(f"\nbig / pre-resized, data epoch: fastai {ratio('fastai', 0):.2f}x, fastlesson {ratio('fastlesson', 0):.2f}x"
          f" (target <= 1.2x); training: fastai {ratio('fastai', 2):.2f}x, fastlesson {ratio('fastlesson', 2):.2f}x")
    print(f"fastlesson's one-off decode of the big photos in load_data: {once:.1f} s "
          f"({1000 * once / rows[('big', 'fastlesson')][1]:.0f} ms per photo, cached for every later epoch and run)")
    print(f"fastai / fastlesson on big photos, data epoch: {rows[('big', 'fastai')][0] / rows[('big', 'fastlesson')][0]:.1f}x")
    summary = {"rows": {f"{k[0]}/{k[1]}": dict(zip(("data_s", "data_n", "train_s", "train_n"), v))
                        for k, v in rows.items()},
               "setup_s": {f"{k[0]}/{k[1]}": v for k, v in setup.items()},
               "args": vars(a), "env": env_summary(repeats=a.repeats)}
    (CACHE / "bench.json").write_text(json.dumps(summary, indent=2))
    print(f"figures: {CACHE / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
