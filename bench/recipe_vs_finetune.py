"""The eight-step recipe vs plain fastai fine_tune, given the same wall-clock time, side by side.

    python bench/recipe_vs_finetune.py                      # flowers102-small, lite0, 160 px, recipe defaults
    python bench/recipe_vs_finetune.py --head-cycles 1 --lr-find-iters 50
                                                            # the 20-minute budget on 2 CPU cores (~45 min)
    python bench/recipe_vs_finetune.py --limit 3 --smoke    # 3 images per class and split: a quick check

1. The recipe (fastlesson.run_recipe) runs and its total wall time T is measured (LR range tests,
   precompute, every training step, final validation, TTA, plots and export all included).
2. Plain fastai: the same data split and transforms, the same backbone with the same ImageNet
   weights and fastai head (fastlesson.build_model), fastai's default two-group splitter for timm
   models (body | head, what vision_learner gives a timm arch), and `learn.fine_tune(E)` with
   fastai's defaults (freeze_epochs=1, base_lr=2e-3), then the same `learn.tta()` as the recipe.
   E is the largest epoch count that fits in T with that TTA, from one timed frozen epoch, one
   timed unfrozen epoch and one timed TTA on a throwaway copy (not counted in T).
   No channels-last, BatchNorm freezing or early-group freezing there: that is what the recipe adds.
Both sides print validation accuracy without and with TTA (fastai's tta, 4 augmented passes and the
plain one); `--no-tta` leaves TTA out of both, and out of the time.
Target (issue 3): recipe >= 90% validation accuracy within 20 minutes on 2 cores, ahead of fine_tune.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import ARCH, DEFAULT_DATA, env_summary, resolve_data, subsample  # noqa: E402


def fastai_learner(data: Path, cfg, seed: int):
    """Plain fastai Learner: same data and backbone as the recipe, fastai's splitter and defaults."""
    from fastai.data.transforms import Normalize
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.vision.all import Learner, default_split

    from fastlesson.data import load_data
    from fastlesson.models import build_model, model_stats

    dls = load_data(str(data), size=cfg.size, bs=cfg.bs, seed=seed, valid_pct=cfg.valid_pct).dls
    dls.add_tfms([Normalize.from_stats(*model_stats(ARCH))], "after_batch")  # as vision_learner does
    set_seed(seed)
    model = build_model(ARCH, dls.c, pretrained=True)
    learn = Learner(dls, model, splitter=default_split, metrics=accuracy)
    learn.freeze()
    return learn


def timed_epochs(data: Path, cfg, seed: int) -> tuple[float, float, float]:
    """Seconds for one frozen and one unfrozen epoch (training + validation) and for TTA (0 without)
    on a throwaway learner."""
    from fastlesson.recipe import TTA_N

    learn = fastai_learner(data, cfg, seed)
    with learn.no_bar(), learn.no_logging():
        t0 = time.perf_counter()
        learn.fit_one_cycle(1, 2e-3)
        t_frozen = time.perf_counter() - t0
        learn.unfreeze()
        t0 = time.perf_counter()
        learn.fit_one_cycle(1, slice(2e-5, 1e-3))
        t_unfrozen = time.perf_counter() - t0
        t_tta = 0.0
        if cfg.tta:
            t0 = time.perf_counter()
            learn.tta(n=TTA_N)
            t_tta = time.perf_counter() - t0
    return t_frozen, t_unfrozen, t_tta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"Udacity-layout folder [{DEFAULT_DATA}]")
    p.add_argument("--size", type=int, default=160, help="input side in px [160]")
    p.add_argument("--bs", type=int, default=32, help="batch size [32]")
    p.add_argument("--opt", default="adam", help="recipe optimizer [adam]")
    p.add_argument("--epochs-max", type=int, default=7, help="recipe step 8 epoch bound [7]")
    p.add_argument("--head-cycles", type=int, default=2, help="recipe step 4: one-epoch SGDR cycles [2]")
    p.add_argument("--lr-find-iters", type=int, default=100, help="batches per recipe LR range test [100]")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, help="use only the first N images per class and split (quick check)")
    p.add_argument("--smoke", action="store_true", help="recipe in smoke mode (32 px, 1 epoch per step)")
    p.add_argument("--no-tta", action="store_true", help="no test-time augmentation on either side")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="folder for the recipe run and bench.json [a temp folder]")
    a = p.parse_args(argv)

    import torch
    from fastai.metrics import accuracy

    from fastlesson.recipe import TTA_N, RecipeConfig, run_recipe

    if a.threads:
        torch.set_num_threads(a.threads)
    data = resolve_data(a.data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    if a.limit:
        data = subsample(data, a.limit, tmp / "data")
    out = a.out or tmp / "run"
    cfg = RecipeConfig(data=str(data), arch=ARCH, size=a.size, bs=a.bs, opt=a.opt, epochs_max=a.epochs_max,
                       head_cycles=a.head_cycles, lr_find_iters=a.lr_find_iters, seed=a.seed,
                       out=str(out / "recipe"), tta=not a.no_tta, smoke=a.smoke).effective()

    t0 = time.perf_counter()
    res = run_recipe(cfg)
    t_recipe = time.perf_counter() - t0
    recipe_epochs = sum(s.get("epochs", 0) for s in res.steps if s["name"] in
                        ("precompute", "head_sgdr", "full_sgdr"))

    print(f"\nCalibrating fastai fine_tune: one frozen and one unfrozen epoch{' and a TTA' if cfg.tta else ''} "
          "(not counted)", flush=True)
    t_fz, t_uf, t_tta = timed_epochs(data, cfg, a.seed)
    n_epochs = max(1, math.floor((t_recipe - t_fz - t_tta) / t_uf))
    print(f"  frozen epoch {t_fz:.1f} s, unfrozen epoch {t_uf:.1f} s, TTA {t_tta:.1f} s -> fine_tune({n_epochs}) "
          f"fits in {t_recipe:.0f} s", flush=True)
    learn = fastai_learner(data, cfg, a.seed)
    t0 = time.perf_counter()
    learn.fine_tune(n_epochs)  # fastai defaults: freeze_epochs=1, base_lr=2e-3, lr_mult=100
    ft_loss, ft_acc = (float(v) for v in learn.validate())
    ft_tta = None
    if cfg.tta:
        ft_tta = float(accuracy(*learn.tta(n=TTA_N)))
    t_ft = time.perf_counter() - t0

    rows = [("fastlesson recipe (8 steps)", res.accuracy, res.accuracy_tta, t_recipe, f"{recipe_epochs}"),
            (f"fastai fine_tune({n_epochs})", ft_acc, ft_tta, t_ft, f"1+{n_epochs}")]
    print("\n" + env_summary(repeats=1))
    print(f"data: {data} ({res.metrics['final']['n_valid']} valid images, {res.metrics['final']['n_classes']} "
          f"classes), arch {ARCH}, {cfg.size} px, bs {cfg.bs}, recipe opt {cfg.opt}")
    print("\n| method | valid accuracy | with TTA | wall time (s) | training epochs |\n|---|---|---|---|---|")
    for name, acc, acc_tta, secs, ep in rows:
        print(f"| {name} | {100 * acc:.1f}% | {'-' if acc_tta is None else f'{100 * acc_tta:.1f}%'} | "
              f"{secs:.0f} | {ep} |")
    tta_gap = "" if ft_tta is None else f", {100 * (res.accuracy_tta - ft_tta):+.1f} with TTA"
    print(f"\nrecipe - fine_tune: {100 * (res.accuracy - ft_acc):+.1f} points{tta_gap}, at "
          f"{t_ft / t_recipe:.2f}x the recipe's time (TTA included); recipe run: {res.out / 'report.md'}")
    summary = {"recipe": {"accuracy": res.accuracy, "accuracy_tta": res.accuracy_tta, "seconds": t_recipe,
                          "epochs": recipe_epochs, "valid_loss": res.valid_loss},
               "fine_tune": {"accuracy": ft_acc, "accuracy_tta": ft_tta, "valid_loss": ft_loss, "seconds": t_ft,
                             "epochs": n_epochs, "calibration_seconds": [t_fz, t_uf, t_tta]},
               "config": {k: str(v) for k, v in vars(cfg).items()}, "env": env_summary(repeats=1)}
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
