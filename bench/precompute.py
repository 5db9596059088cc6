"""precompute_head vs fastai's frozen fit_one_cycle: same data, backbone, epochs and LR, side by side.

    python bench/precompute.py                       # flowers102-small, 160 px, 2 epochs (CPU: ~10 min)
    python bench/precompute.py --limit 4 --epochs 1  # 4 images per class and split: a quick check

Targets (issue 2): each head epoch >= 20x faster once the cache exists, the whole step
(cache build + epochs) >= 3x faster, validation accuracy within 1 point.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import ARCH, DEFAULT_DATA, env_summary, resolve_data, subsample  # noqa: E402

from fastlesson.data import load_data  # noqa: E402
from fastlesson.models import create_learner  # noqa: E402
from fastlesson.precompute import clear_memory_cache, precompute_head  # noqa: E402


def make_learner(data: Path, size: int, bs: int, seed: int):
    """Same seed -> same data order and the same head initialisation for both contenders."""
    from fastai.torch_core import set_seed

    dls = load_data(data, size=size, bs=bs, seed=seed).dls
    set_seed(seed)
    return create_learner(dls, ARCH)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="train/ + valid/ class folders (default: %(default)s)")
    ap.add_argument("--size", type=int, default=160, help="image side in px (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=2, help="head epochs for both (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-2, help="one-cycle lr_max for both (default: %(default)s)")
    ap.add_argument("--bs", type=int, default=64, help="batch size (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="images per class and split, for a quick run")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    data = resolve_data(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        if args.limit:
            data = subsample(data, args.limit, Path(tmp) / "data")
        cache_dir = Path(tmp) / "cache"

        # plain fastai: frozen body, augmented images every epoch
        learn = make_learner(data, args.size, args.bs, args.seed)
        n_train, n_valid = len(learn.dls.train_ds), len(learn.dls.valid_ds)
        t0 = time.perf_counter()
        learn.fit_one_cycle(args.epochs, args.lr)
        fastai_s = time.perf_counter() - t0
        fastai_acc = float(learn.recorder.values[-1][2])

        # fastlesson: body once (no augmentation), head on the cached activations
        learn = make_learner(data, args.size, args.bs, args.seed)
        res = precompute_head(learn, args.epochs, lr_max=args.lr, cache_dir=cache_dir)
        # once the cache exists on disk: a fresh process would only load it
        clear_memory_cache()
        hit = precompute_head(make_learner(data, args.size, args.bs, args.seed), args.epochs,
                              lr_max=args.lr, cache_dir=cache_dir)
        cache_mb = res.cache_path.stat().st_size / 2**20

    fastai_epoch = fastai_s / args.epochs
    ours_step = res.seconds_cache + res.seconds_train
    print("\n== precompute_head vs fastai frozen fit_one_cycle ==")
    print(f"data: {args.data} ({n_train} train / {n_valid} valid images, {args.size} px, bs {args.bs}), "
          f"arch {ARCH}, {args.epochs} epochs, lr_max {args.lr}, features {res.feature_shape}")
    print(f"{'':28}{'fastai':>12}{'precompute':>12}{'ratio':>9}{'target':>9}")
    print(f"{'seconds per head epoch':28}{fastai_epoch:12.2f}{res.seconds_per_epoch:12.2f}"
          f"{fastai_epoch / res.seconds_per_epoch:8.1f}x{'>= 20x':>9}")
    print(f"{'seconds, whole step':28}{fastai_s:12.1f}{ours_step:12.1f}{fastai_s / ours_step:8.1f}x{'>= 3x':>9}")
    print(f"{'  of which cache build':28}{'':12}{res.seconds_cache:12.1f}")
    print(f"{'  cache load from disk':28}{'':12}{hit.seconds_cache:12.1f}   ({cache_mb:.0f} MB, hit={hit.cache_hit})")
    print(f"{'valid accuracy (%)':28}{100 * fastai_acc:12.2f}{100 * res.accuracy:12.2f}"
          f"{100 * (res.accuracy - fastai_acc):+8.2f}pt{'|d| <= 1':>9}")
    print(f"{'valid loss':28}{'':12}{res.valid_loss:12.4f}")
    print(f"(second precompute run from the disk cache: accuracy {100 * hit.accuracy:.2f}%)")
    print(env_summary(repeats=1))


if __name__ == "__main__":
    main()
