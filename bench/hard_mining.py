"""Hard-example mining vs plain training on the full CIFAR-10: same small CNN, same budget, several seeds.

    python bench/hard_mining.py --plan              # measure a few batches, print the sizing, no training
    python bench/hard_mining.py                     # full CIFAR-10, 3 seeds, epochs sized for ~45 min
    python bench/hard_mining.py --epochs 12         # a fixed schedule (reproducible size)
    python bench/hard_mining.py --variant warmup=2 --variant frac=0.5,weight=3   # extra mining arms

The seed (CIFAR-100) reported that up-weighting the highest-loss examples raised test accuracy from 50% to
55%. Here, per seed, every arm starts from the same initial weights and sees the same batches in the same
order with the same augmentation (checked: a CRC of every training batch is printed per arm); only the
loss weighting differs. Prints test accuracy per seed, mean ± std of each arm, and the paired difference
(mining - plain). The plateau check trains the plain arm of seed 0 for half the epochs as well: if the
full schedule gains little over half of it, the plain model has reached its plateau.

The images are decoded once into uint8 tensors and augmented on the batch (pad-crop + flip, see
bench/_cifar.py); the model runs in channels-last memory format (1.6x faster on this CPU, measured).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, bench/_cifar.py
from _cifar import (  # noqa: E402
    BatchDigest,
    ChannelsLast,
    PadCropFlip,
    SkipValidation,
    ToFloat,
    channel_stats,
    load_cifar,
    make_dls,
    mean_std,
    train_seconds_per_image,
)
from _common import env_summary, resolve_data  # noqa: E402

from fastlesson.callbacks import HardExampleMining  # noqa: E402
from fastlesson.schedule import fit_one_cycle  # noqa: E402
from fastlesson.smallcnn import small_cnn, small_cnn_splitter  # noqa: E402

DATA = "../shared/data/cifar10"  # train/ (5000 per class) and test/ (200 per class), repo-relative
TRAIN_PER_CLASS = 0  # images per class used for training (0 = all 5000: the full training set)
TEST_PER_CLASS = 0  # images per class for the test accuracy (0 = all: 200/class here)
# One-cycle epochs, the same for every arm; "auto" = the most (up to MAX_EPOCHS) whose projection from a
# few measured batches fits BUDGET_MIN. Measured under the other engineers' load on this 2-core CPU:
# 1.8-2.6 ms per training image (channels-last, 1 thread), 100-145 s per epoch of 50,000 -> only 3-4
# epochs for 6.5 runs in 45 min; a quiet machine fits more. The plateau check says whether it was enough.
EPOCHS = "auto"
MAX_EPOCHS = 16  # the auto schedule stops here (a 30k-parameter model is near its plateau by then)
MIN_EPOCHS = 3
BUDGET_MIN = 45.0  # minutes the auto schedule aims at (everything: all arms, seeds, plateau check)
LR = 3e-3  # one-cycle peak LR (Adam), picked for this model
BS = 128  # images per batch
CHANNELS = (16, 32)  # feature maps per VGG block (2 convs + BN each: small_cnn's default design)
FC = (128,)  # hidden FC sizes
SEEDS = 3  # repeats; each seed runs every arm
FRAC, WEIGHT = 0.25, 2.0  # HardExampleMining defaults: top 25% of each batch get weight 2
# torch threads; "auto" times a few batches with 1 and with 2 and keeps the faster: on this 2-core machine
# under the other engineers' load one thread ran up to 5x faster than two, on a quiet one two are faster
THREADS = "auto"


def parse_variant(text: str) -> dict:
    """'frac=0.5,weight=3,warmup=2' -> {'frac': 0.5, 'weight': 3.0, 'warmup': 2}; missing keys: defaults."""
    out = {"frac": FRAC, "weight": WEIGHT, "warmup": 0}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in out or not value:
            raise ValueError(f"--variant {text!r}: use key=value pairs of frac, weight, warmup, "
                             f"e.g. frac=0.5,weight=3,warmup=2")
        out[key.strip()] = int(value) if key.strip() == "warmup" else float(value)
    return out


def arm_name(v: dict | None) -> str:
    return "plain" if v is None else f"mining frac {v['frac']:g} weight {v['weight']:g} warmup {v['warmup']}"


def build(n_classes: int, args) -> nn.Module:
    model = small_cnn(n_classes, channels=args.channels, fc=args.fc)
    return model.to(memory_format=torch.channels_last)


def run_once(data, seed: int, variant: dict | None, epochs: int, args) -> tuple[float, float, int]:
    """Train one arm; returns (test accuracy, seconds, batch CRC)."""
    classes, train, test, stats = data
    dls, _ = make_dls(train, test, args.bs, seed, drop_last=True)
    set_seed(seed, reproducible=True)  # same initial weights, batch order and augmentation in every arm
    digest = BatchDigest()
    learn = Learner(dls, build(len(classes), args), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    splitter=small_cnn_splitter, cbs=[ToFloat(*stats), PadCropFlip(), ChannelsLast(), digest])
    cbs = [SkipValidation()]
    if variant is not None:
        cbs.append(HardExampleMining(frac=variant["frac"], weight=variant["weight"],
                                     warmup_epochs=variant["warmup"]))
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        fit_one_cycle(learn, epochs, args.lr, cbs=cbs)
        acc = float(learn.validate()[1])  # the valid loader holds the test split
    return acc, time.perf_counter() - t0, digest.digest


def seconds_per_image(n_classes: int, args, batches: int = 6) -> float:
    """Measured seconds per training image (forward + backward + Adam step) at batch size args.bs."""
    return train_seconds_per_image(build(n_classes, args), args.lr, args.bs, n_classes, batches)


def pick_threads(args, measure) -> float:
    """Set torch's threads (args.threads, or the faster of 1 and 2 for auto); `measure()` at that setting."""
    if args.threads != "auto":
        torch.set_num_threads(int(args.threads))
        return measure()
    timed = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        timed[n] = measure()
    best = min(timed, key=timed.get)
    torch.set_num_threads(best)
    args.threads = best
    print(f"threads auto: {', '.join(f'{n}: {1000 * t:.2f} ms/image' for n, t in timed.items())} -> {best}")
    return timed[best]


def size_schedule(args, n_train: int) -> int:
    """Print the sizing; the epochs to run (args.epochs, or the most that fit the budget)."""
    per_image = pick_threads(args, lambda: seconds_per_image(10, args))
    arms = 1 + len(args.variants)
    # every arm of every seed, plus the plateau check's half-length plain run
    epoch_units = args.seeds * arms + (0.5 if args.plateau_check else 0)
    per_epoch = 1.1 * n_train * per_image  # +10% for the augmentation and the final test pass
    fit = int(60 * args.budget_min / (epoch_units * per_epoch))
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, fit)) if args.epochs == "auto" else int(args.epochs)
    print(f"sizing: {1000 * per_image:.2f} ms per training image (measured now) -> ~{per_epoch:.0f} s per epoch of "
          f"{n_train} images; {epoch_units:g} runs' worth of epochs ({args.seeds} seeds x {arms} arms"
          f"{' + plateau check' if args.plateau_check else ''})")
    if args.epochs == "auto":
        print(f"  --epochs auto: {fit} epochs fit --budget-min {args.budget_min:g}; running {epochs} "
              f"(clamped to {MIN_EPOCHS}..{MAX_EPOCHS}; rerun with --epochs {epochs} to repeat this size)")
    print(f"  projected: ~{epoch_units * epochs * per_epoch / 60:.0f} min", flush=True)
    return epochs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS, help="0 = all")
    p.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS, help="0 = all")
    p.add_argument("--epochs", default=EPOCHS, help="one-cycle epochs, or auto (fit --budget-min)")
    p.add_argument("--budget-min", type=float, default=BUDGET_MIN, help="minutes --epochs auto aims at")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--bs", type=int, default=BS)
    p.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS))
    p.add_argument("--fc", type=int, nargs="*", default=list(FC))
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--frac", type=float, default=FRAC, help="the main mining arm's fraction of hard examples")
    p.add_argument("--weight", type=float, default=WEIGHT, help="the main mining arm's weight")
    p.add_argument("--warmup", type=int, default=0, help="the main mining arm's epochs before mining starts")
    p.add_argument("--variant", dest="variants", action="append", default=[], type=parse_variant,
                   help="an extra mining arm, e.g. warmup=2 or frac=0.5,weight=3 (repeatable)")
    p.add_argument("--plateau-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also train seed 0's plain arm for half the epochs")
    p.add_argument("--threads", default=THREADS, help="torch threads, or auto (the faster of 1 and 2)")
    p.add_argument("--plan", action="store_true", help="print the sizing and exit")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1 seed")
    if args.epochs != "auto" and (not str(args.epochs).isdigit() or int(args.epochs) < 1):
        raise ValueError(f"--epochs {args.epochs!r}: give a positive number of epochs or auto")
    if args.threads != "auto" and (not str(args.threads).isdigit() or int(args.threads) < 1):
        raise ValueError(f"--threads {args.threads!r}: give a positive number or auto")
    n_train = 10 * (args.train_per_class or 5000)
    main_arm = {"frac": args.frac, "weight": args.weight, "warmup": args.warmup}
    arms = [None, main_arm, *args.variants]
    args.variants = arms[1:]  # every mining arm, for the sizing
    epochs = size_schedule(args, n_train)
    print(f"data: {args.data} (train {args.train_per_class or 'all'}/class, test {args.test_per_class or 'all'}/class)")
    print(f"model: small_cnn(channels={tuple(args.channels)}, fc={tuple(args.fc)}) with BN, {epochs} epochs "
          f"one-cycle lr {args.lr} (Adam), bs {args.bs}, pad-crop + flip; arms: "
          + "; ".join(arm_name(a) for a in arms))
    if args.plan:
        return
    classes, train, test = load_cifar(resolve_data(args.data), args.train_per_class, args.test_per_class)
    data = (classes, train, test, channel_stats(train[0]))
    print(f"images: {len(train[1])} train, {len(test[1])} test, {len(classes)} classes", flush=True)

    accs: dict[str, list[float]] = {arm_name(a): [] for a in arms}
    for seed in range(args.seeds):
        line, digests = [f"seed {seed}:"], set()
        for a in arms:
            acc, secs, crc = run_once(data, seed, a, epochs, args)
            accs[arm_name(a)].append(acc)
            digests.add(crc)
            line.append(f"{arm_name(a)} {100 * acc:.2f}% ({secs:.0f} s)")
        same = "same batches in every arm" if len(digests) == 1 else "BATCHES DIFFER between arms"
        print("  ".join(line) + f"  [{same}]", flush=True)

    plain = accs["plain"]
    print(f"\ntest accuracy % (mean ± std over {args.seeds} seeds, {len(test[1])} test images, "
          f"{len(train[1])} train, {epochs} epochs)")
    for a in arms:
        print(f"  {arm_name(a):<42} {mean_std(accs[arm_name(a)])}")
    for a in arms[1:]:
        diffs = [m - q for q, m in zip(plain, accs[arm_name(a)])]
        print(f"  {arm_name(a)} - plain: {mean_std(diffs)} points (paired by seed; per seed: "
              + ", ".join(f"{100 * d:+.2f}" for d in diffs) + ")")
    noise = 100 * math.sqrt(statistics.mean(plain) * (1 - statistics.mean(plain)) / len(test[1]))
    print(f"  binomial noise of one test accuracy on {len(test[1])} images: ±{noise:.2f} points")
    if args.plateau_check:
        half = max(1, epochs // 2)
        acc_half, secs, _ = run_once(data, 0, None, half, args)
        print(f"plateau check (seed 0, plain): {half} epochs {100 * acc_half:.2f}% vs {epochs} epochs "
              f"{100 * plain[0]:.2f}% -> doubling the schedule gained {100 * (plain[0] - acc_half):+.2f} points "
              f"({secs:.0f} s)")
    print(env_summary(repeats=args.seeds))


if __name__ == "__main__":
    main()
