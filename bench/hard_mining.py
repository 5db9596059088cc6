"""Hard-example mining vs plain training: same small CNN, same data, same budget, several seeds.

    python bench/hard_mining.py                      # defaults below, ~10 min on 2 CPU cores
    python bench/hard_mining.py --train-per-class 0  # the whole data set (slow on CPU)

Prints test accuracy per seed, mean ± std of each arm, and the paired difference (mining - plain).
Both arms of a seed start from the same weights and see the same batches; only the loss weighting differs.
The images are decoded once into tensors and augmented on the batch (pad-crop + flip): fastai's per-item
pipeline costs about 10 ms per 32 px image on a 2-core CPU, more than the model, and would dominate the budget.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelValidException
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from PIL import Image
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py
from _common import env_summary, resolve_data  # noqa: E402

from fastlesson.callbacks import HardExampleMining  # noqa: E402
from fastlesson.schedule import fit_one_cycle  # noqa: E402
from fastlesson.smallcnn import small_cnn, small_cnn_splitter  # noqa: E402

DATA = "../shared/data/cifar10-small"  # train/ and test/ class folders of 32 px JPEGs (repo-relative)
TRAIN_PER_CLASS = 300  # images per class used for training (0 = all); CPU budget
TEST_PER_CLASS = 0  # images per class for the test accuracy (0 = all: 200/class here)
EPOCHS = 8  # one-cycle epochs, the same for both arms
LR = 3e-3  # one-cycle peak LR (Adam), picked for this model
BS = 64  # images per batch
CHANNELS = (16, 32)  # feature maps per VGG block (the seed used (64, 128); 1/4 for a CPU budget)
FC = (128,)  # hidden FC sizes (the seed used (1024,))
SEEDS = 3  # repeats; each seed runs both arms
FRAC, WEIGHT = 0.25, 2.0  # HardExampleMining defaults: top 25% of each batch get weight 2


def load_split(split_dir: Path, classes: list[str], per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` images (by name; 0 = all) of each class as uint8 NCHW tensors and labels."""
    xs, ys = [], []
    for ci, cls in enumerate(classes):
        files = sorted(f for f in (split_dir / cls).iterdir() if f.is_file())
        for f in files[:per_class] if per_class else files:
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("RGB").resize((32, 32))))
            ys.append(ci)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


def load_cifar(root: Path, train_per_class: int, test_per_class: int):
    """Decode the images once into tensors: train/ and test/ class folders (the test split is the valid set)."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} is missing: --data needs train/ and test/ class folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    return classes, load_split(root / "train", classes, train_per_class), load_split(root / "test", classes, test_per_class)


class SkipValidation(Callback):
    """Skip fastai's per-epoch validation pass during fit: only the final test accuracy is reported."""

    def before_validate(self):
        raise CancelValidException()


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


def make_dls(data, seed: int, bs: int) -> DataLoaders:
    """Normalised float tensors in fastai DataLoaders (shuffled with the seed)."""
    _, (xt, yt), (xv, yv) = data
    xt, xv = xt.float() / 255, xv.float() / 255
    mean, std = xt.mean((0, 2, 3), keepdim=True), xt.std((0, 2, 3), keepdim=True)
    train, valid = TensorDataset((xt - mean) / std, yt), TensorDataset((xv - mean) / std, yv)
    set_seed(seed, reproducible=True)
    return DataLoaders.from_dsets(train, valid, bs=bs, shuffle=True, device="cpu", num_workers=0)


def run_once(data, seed: int, mining: bool, args) -> tuple[float, float]:
    """Train one arm; returns (test accuracy, seconds)."""
    dls = make_dls(data, seed, args.bs)
    set_seed(seed, reproducible=True)  # same initial weights, batch order and augmentation in both arms
    learn = Learner(dls, small_cnn(len(data[0]), channels=args.channels, fc=args.fc),
                    loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=small_cnn_splitter,
                    cbs=PadCropFlip())
    cbs = [SkipValidation()]
    if mining:
        cbs.append(HardExampleMining(frac=args.frac, weight=args.weight, warmup_epochs=args.warmup))
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        fit_one_cycle(learn, args.epochs, args.lr, cbs=cbs)
        acc = float(learn.validate()[1])
    return acc, time.perf_counter() - t0


def mean_std(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    p.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--bs", type=int, default=BS)
    p.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS))
    p.add_argument("--fc", type=int, nargs="*", default=list(FC))
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--frac", type=float, default=FRAC)
    p.add_argument("--weight", type=float, default=WEIGHT)
    p.add_argument("--warmup", type=int, default=0, help="epochs before mining starts")
    # torch threads: on a busy 2-core machine one thread ran this model ~8x faster than two (measured)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1 seed")
    torch.set_num_threads(args.threads)

    print(f"data: {args.data} (train {args.train_per_class or 'all'}/class, test {args.test_per_class or 'all'}/class)")
    print(f"model: small_cnn(channels={tuple(args.channels)}, fc={tuple(args.fc)}), {args.epochs} epochs "
          f"one-cycle lr {args.lr}, bs {args.bs}; mining frac {args.frac} weight {args.weight} "
          f"warmup {args.warmup}")
    data = load_cifar(resolve_data(args.data), args.train_per_class, args.test_per_class)
    print(f"images: {len(data[1][1])} train, {len(data[2][1])} test, {len(data[0])} classes")
    plain, mined = [], []
    for i in range(args.seeds):
        a, ta = run_once(data, i, False, args)
        b, tb = run_once(data, i, True, args)
        plain.append(a)
        mined.append(b)
        print(f"seed {i}: plain {100 * a:.2f}% ({ta:.0f} s)  mining {100 * b:.2f}% ({tb:.0f} s)", flush=True)
    diffs = [b - a for a, b in zip(plain, mined)]
    print(f"\ntest accuracy % (mean ± std over {args.seeds} seeds)")
    print(f"  plain:            {mean_std(plain)}")
    print(f"  hard mining:      {mean_std(mined)}")
    print(f"  mining - plain:   {mean_std(diffs)} points (paired by seed)")
    print(env_summary(repeats=args.seeds))


if __name__ == "__main__":
    main()
