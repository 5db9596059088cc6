"""Tiny CPU test helpers: a 3-group CNN learner on synthetic images, and image folders on disk
(made by fastlesson.synthetic, the one home for synthetic image folders).

Imported by tests as `from _tiny import ...` (not `from conftest import ...`: nbs/ has a conftest too).
"""

from __future__ import annotations

from pathlib import Path

import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import params
from torch import nn
from torch.utils.data import TensorDataset

from fastlesson import synthetic


class TinyCNN(nn.Sequential):
    """Three layer groups (early body, late body, head), like a real backbone + head."""

    def __init__(self, n_classes: int = 3, ch: int = 8):
        early = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU())
        late = nn.Sequential(nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), nn.BatchNorm2d(ch * 2), nn.ReLU())
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch * 2, n_classes))
        super().__init__(nn.Sequential(early, late), head)


def tiny_splitter(model: nn.Module):
    """Groups: early body, late body, head."""
    body, head = model[0], model[1]
    return [params(body[0]), params(body[1]), params(head)]


def synthetic_dsets(n_train=64, n_valid=32, n_classes=3, size=16, seed=0):
    """Images whose class is encoded in the mean of one channel, so a CNN learns it in a few steps."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, n_classes, (n,), generator=g)
        x = torch.randn(n, 3, size, size, generator=g) * 0.5
        x[torch.arange(n), y % 3] += (1.0 + y.float() / n_classes)[:, None, None]
        return TensorDataset(x, y)

    return make(n_train), make(n_valid)


def make_tiny_learner(n_train=64, n_valid=32, n_classes=3, size=16, bs=16, seed=0, splitter=True, **kw):
    """A seconds-fast Learner with three layer groups (fastai's synth_learner in spirit)."""
    torch.manual_seed(seed)
    train, valid = synthetic_dsets(n_train, n_valid, n_classes, size, seed)
    # num_workers=0: worker processes cost more than these tiny batches (3x slower tests)
    dls = DataLoaders.from_dsets(train, valid, bs=bs, shuffle=True, drop_last=False, device="cpu", num_workers=0)
    kw.setdefault("metrics", accuracy)
    if splitter:
        kw.setdefault("splitter", tiny_splitter)
    return Learner(dls, TinyCNN(n_classes), loss_func=nn.CrossEntropyLoss(), **kw)


def make_image_folder(root: Path, classes=("a", "b", "c"), n_per_class=6, size=(40, 32), seed=0,
                      layout="imagenet") -> Path:
    """Small real JPEGs (fastlesson.synthetic): 'imagenet' -> root/train|valid/cls, 'flat' -> root/cls."""
    return synthetic.make_image_folder(root, classes, n_train=n_per_class, n_valid=max(2, n_per_class // 2),
                                       size=size, layout=layout, noise=60, level=160, seed=seed)
