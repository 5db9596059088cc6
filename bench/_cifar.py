"""CIFAR-10 image folders as in-memory tensors, for the CIFAR benches (seed_cifar10.py, hard_mining.py).

The images are decoded once into uint8 tensors and turned into floats (and augmented) on the batch:
fastai's per-item PIL pipeline costs about 3 ms per 32 px image on this 2-core CPU (measured: 30 batches
of 32 from load_data), about an epoch of the seed's model's own compute, and would double the budget.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelValidException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from PIL import Image
from torch.utils.data import TensorDataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def load_split(split_dir, classes: list[str], per_class: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` images (by name; 0 = all) of each class as uint8 NCHW tensors and labels."""
    xs, ys = [], []
    for ci, cls in enumerate(classes):
        files = sorted(f for f in (split_dir / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files[:per_class] if per_class else files:
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("RGB").resize((32, 32))))
            ys.append(ci)
    if not xs:
        raise FileNotFoundError(f"no images under {split_dir}/<class>/: check --data")
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


def load_cifar(root, train_per_class: int = 0, test_per_class: int = 0):
    """(classes, (x_train, y_train), (x_test, y_test)) from train/ and test/ class folders under `root`."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} is missing: --data needs train/ and test/ class folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    return (classes, load_split(root / "train", classes, train_per_class),
            load_split(root / "test", classes, test_per_class))


def split_train(x: torch.Tensor, y: torch.Tensor, train_pct: float, seed: int = 0):
    """Seeded per-class split of (x, y) into train_pct training and the rest validation (as the seed: 80/20)."""
    if not 0 < train_pct < 1:
        raise ValueError(f"train_pct={train_pct!r}: need a fraction in (0, 1), e.g. 0.8")
    g = torch.Generator().manual_seed(seed)
    train_idx, valid_idx = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_train = int(round(len(idx) * train_pct))
        train_idx.append(idx[:n_train])
        valid_idx.append(idx[n_train:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(valid_idx).sort().values
    return (x[tr], y[tr]), (x[va], y[va])


def make_dls(train, valid, bs: int, seed: int, test=None, eval_bs: int = 500, drop_last: bool = False):
    """fastai DataLoaders over uint8 tensors (shuffled with `seed`); plus a test DataLoader when given.

    `drop_last` drops a last partial training batch (BatchNorm fails on a batch of one)."""
    torch.manual_seed(seed)
    import random

    random.seed(seed)  # fastai DataLoaders draw their shuffle RNG from Python's `random` at creation
    dls = DataLoaders(DataLoader(TensorDataset(*train), bs=bs, shuffle=True, drop_last=drop_last),
                      DataLoader(TensorDataset(*valid), bs=eval_bs), device="cpu")
    test_dl = DataLoader(TensorDataset(*test), bs=eval_bs) if test is not None else None
    return dls, test_dl


class ToFloat(Callback):
    """uint8 batch -> float in [0, 1], then (x - mean) / std when given (every batch, train and valid)."""
    order = -20

    def __init__(self, mean=None, std=None):
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def before_batch(self):
        x = self.learn.xb[0].float() / 255
        if self.mean is not None:
            x = (x - self.mean) / self.std
        self.learn.xb = (x,)


class PadCropFlip(Callback):
    """CIFAR augmentation on the batch tensor: reflect-pad 4 px, random 32 px crop, random h-flip (train only)."""
    run_valid, order = False, -10

    def before_batch(self):
        x = self.learn.xb[0]
        n, _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
        ij = torch.randint(0, 9, (n, 2))
        x = torch.stack([padded[k, :, i:i + h, j:j + w] for k, (i, j) in enumerate(ij.tolist())])
        flip = torch.rand(n) < 0.5
        x[flip] = x[flip].flip(3)
        self.learn.xb = (x,)


class ChannelsLast(Callback):
    """The batch in channels-last memory format (after any augmentation): faster CPU convolutions (1.3-1.6x
    for small_cnn here, measured); put the model in the same format with `model.to(memory_format=...)`."""
    order = -5

    def before_batch(self):
        self.learn.xb = (self.learn.xb[0].contiguous(memory_format=torch.channels_last),)


class SkipValidation(Callback):
    """Skip fastai's per-epoch validation pass during fit: only the final test accuracy is reported."""

    def before_validate(self):
        raise CancelValidException()


class BatchDigest(Callback):
    """A CRC of every training batch's labels and pixel sums (after augmentation): equal digests mean
    two runs saw the same images in the same order with the same augmentation."""
    run_valid, order = False, 0

    def before_fit(self):
        self.digest = 0

    def before_batch(self):
        x, y = self.learn.xb[0], self.learn.yb[0]
        sums = x.float().sum((1, 2, 3)).double().numpy().round(3).tobytes()
        self.digest = zlib.crc32(y.numpy().tobytes() + sums, self.digest)


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    xf = x.float() / 255
    return xf.mean((0, 2, 3)).tolist(), xf.std((0, 2, 3)).tolist()


def mean_std(xs: list[float], scale: float = 100.0) -> str:
    """'m ± s' of xs (times `scale`, e.g. percent), the sample std; just 'm' for one value (no spread)."""
    import statistics

    if len(xs) < 2:
        return f"{scale * statistics.mean(xs):.2f}"
    return f"{scale * statistics.mean(xs):.2f} ± {scale * statistics.stdev(xs):.2f}"


def train_seconds_per_image(model, lr: float, bs: int, n_classes: int, batches: int) -> float:
    """Measured seconds per training image (forward + backward + Adam step) on random 32 px batches of `bs`."""
    import time

    from torch import nn

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.rand(bs, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (bs,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up: first-call allocations
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    return (time.perf_counter() - t0) / (batches * bs)
