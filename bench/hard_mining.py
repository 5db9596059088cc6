"""Hard-example mining vs plain training: same small CNN, same data, same budget, several seeds.

    python bench/hard_mining.py                      # defaults below, ~10 min on 2 CPU cores
    python bench/hard_mining.py --train-per-class 0  # the whole data set (slow on CPU)

Prints test accuracy per seed, mean ± std of each arm, and the paired difference (mining - plain).
Both arms of a seed start from the same weights and see the same batches; only the loss weighting differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py
from _common import env_summary  # noqa: E402

from fastlesson.callbacks import HardExampleMining  # noqa: E402
from fastlesson.data import load_data  # noqa: E402
from fastlesson.schedule import fit_one_cycle  # noqa: E402
from fastlesson.smallcnn import small_cnn, small_cnn_splitter  # noqa: E402

DATA = "/work/shared/data/cifar10-small"  # train/ and test/ class folders of 32 px JPEGs
TRAIN_PER_CLASS = 300  # images per class used for training (0 = all); CPU budget
TEST_PER_CLASS = 100  # images per class for the test accuracy (0 = all)
EPOCHS = 6  # one-cycle epochs, the same for both arms
LR = 3e-3  # one-cycle peak LR (Adam), picked for this model
BS = 64  # images per batch
CHANNELS = (32, 64)  # feature maps per VGG block (the seed used (64, 128); halved for CPU)
FC = (256,)  # hidden FC sizes
SEEDS = 3  # repeats; each seed runs both arms
FRAC, WEIGHT = 0.25, 2.0  # HardExampleMining defaults: top 25% of each batch get weight 2


def subset_folder(src: Path, dst: Path, per_class: dict[str, int]) -> Path:
    """Symlink the first N images (by name) of each class of each split into dst; N = 0 keeps all."""
    for split, n in per_class.items():
        split_dir = src / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} is missing: --data needs train/ and test/ class folders")
        for cls in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.is_file())
            out = dst / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in files[:n] if n else files:
                (out / f.name).symlink_to(f.resolve())
    return dst


def run_once(path: Path, seed: int, mining: bool, args) -> tuple[float, float]:
    """Train one arm; returns (test accuracy, seconds)."""
    set_seed(seed, reproducible=True)
    dls = load_data(path, size=32, bs=args.bs, seed=seed).dls
    set_seed(seed, reproducible=True)  # same initial weights and batch order in both arms
    learn = Learner(dls, small_cnn(len(dls.vocab), channels=args.channels, fc=args.fc),
                    loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=small_cnn_splitter)
    cbs = [HardExampleMining(frac=args.frac, weight=args.weight, warmup_epochs=args.warmup)] if mining else []
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
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1 seed")
    torch.set_num_threads(args.threads)

    print(f"data: {args.data} (train {args.train_per_class or 'all'}/class, test {args.test_per_class or 'all'}/class)")
    print(f"model: small_cnn(channels={tuple(args.channels)}, fc={tuple(args.fc)}), {args.epochs} epochs "
          f"one-cycle lr {args.lr}, bs {args.bs}; mining frac {args.frac} weight {args.weight} "
          f"warmup {args.warmup}")
    plain, mined = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = subset_folder(Path(args.data), Path(tmp) / "data",
                             {"train": args.train_per_class, "test": args.test_per_class})
        for i in range(args.seeds):
            a, ta = run_once(path, i, False, args)
            b, tb = run_once(path, i, True, args)
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
