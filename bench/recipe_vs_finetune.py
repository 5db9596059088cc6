"""The eight-step recipe vs plain fastai fine_tune, given the same wall-clock time, side by side.

    python bench/recipe_vs_finetune.py                      # flowers102-small, lite0, 160 px, recipe defaults
    python bench/recipe_vs_finetune.py --arch lite0 lite1 lite2
                                                            # each architecture, recipe and fine_tune, one table
    python bench/recipe_vs_finetune.py --arch lite2 --size native --budget 12
                                                            # lite2 at its native 260 px, 12-minute recipe budget
    python bench/recipe_vs_finetune.py --head-cycles 1 --lr-find-iters 50
                                                            # the 20-minute budget on 2 CPU cores (~45 min)
    python bench/recipe_vs_finetune.py --arch lite0 lite1 lite2 --budget 12 --recipe-only
                                                            # the architectures under one budget, recipe only
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
With several `--arch`, each architecture runs both sides in turn (same data, size and seed) and the
table has two rows per architecture; accuracy per minute is validation accuracy / wall minutes.
Targets: issue 3, recipe >= 90% validation accuracy within 20 minutes on 2 cores, ahead of fine_tune;
issue 15, the default recipe >= 93% within 12 minutes, >= 15 points ahead of fine_tune at equal time.
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

ARCH_ALIASES = {f"lite{i}": f"tf_efficientnet_lite{i}" for i in range(3)}  # offline ImageNet weights


def arch_name(name: str) -> str:
    """'lite0'/'lite1'/'lite2' -> timm's tf_efficientnet_liteN; any other name as given."""
    return ARCH_ALIASES.get(name, name)


def input_size(size: str, arch: str) -> int:
    """--size: a side in px, or 'native' for the architecture's pretraining resolution (timm's cfg)."""
    if size == "native":
        from fastlesson.models import native_size

        px = native_size(arch)
        if px is None:
            raise SystemExit(f"--size native: {arch} has no native size on record; pass --size PX")
        return px
    try:
        return int(size)
    except ValueError:
        raise SystemExit(f"--size {size!r}: pass a side in px (e.g. 160) or 'native'") from None


def fastai_learner(data: Path, cfg, seed: int):
    """Plain fastai Learner: same data and backbone as the recipe, fastai's splitter and defaults."""
    from fastai.data.transforms import Normalize
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.vision.all import Learner, default_split

    from fastlesson.data import load_data
    from fastlesson.models import build_model, model_stats

    dls = load_data(str(data), size=cfg.size, bs=cfg.bs, seed=seed, valid_pct=cfg.valid_pct).dls
    dls.add_tfms([Normalize.from_stats(*model_stats(cfg.arch))], "after_batch")  # as vision_learner does
    set_seed(seed)
    model = build_model(cfg.arch, dls.c, pretrained=True)
    learn = Learner(dls, model, splitter=default_split, metrics=accuracy)
    learn.freeze()
    return learn


def timed_epochs(data: Path, cfg, seed: int) -> tuple[float, float, float]:
    """Seconds for one frozen and one unfrozen epoch (training + validation) and for TTA (0 without)
    on a throwaway learner."""
    from fastlesson.export import learner_tta

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
            learner_tta(learn)
            t_tta = time.perf_counter() - t0
    return t_frozen, t_unfrozen, t_tta


def run_pair(data: Path, a, arch: str, out: Path) -> dict:
    """The recipe for `arch`, then plain fine_tune given the recipe's wall time; their figures."""
    from fastai.metrics import accuracy

    from fastlesson.export import learner_tta
    from fastlesson.recipe import RecipeConfig, run_recipe

    size = input_size(a.size, arch)
    cfg = RecipeConfig(data=str(data), arch=arch, size=size, bs=a.bs, opt=a.opt, epochs_max=a.epochs_max,
                       head_cycles=a.head_cycles, lr_find_iters=a.lr_find_iters, seed=a.seed,
                       out=str(out / "recipe"), tta=not a.no_tta, smoke=a.smoke, budget=a.budget).effective()

    t0 = time.perf_counter()
    res = run_recipe(cfg)
    t_recipe = time.perf_counter() - t0
    recipe_epochs = sum(s.get("epochs", 0) for s in res.steps if s["name"] in
                        ("precompute", "head_sgdr", "full_sgdr"))
    run = {"arch": arch, "size": cfg.size, "cfg": cfg, "res": res, "data_info": res.metrics["final"],
           "recipe": {"accuracy": res.accuracy, "accuracy_tta": res.accuracy_tta, "seconds": t_recipe,
                      "epochs": recipe_epochs, "valid_loss": res.valid_loss,
                      "budget": res.metrics.get("budget")},
           "fine_tune": None}
    if a.recipe_only:
        return run

    print(f"\nCalibrating fastai fine_tune ({arch}): one frozen and one unfrozen epoch"
          f"{' and a TTA' if cfg.tta else ''} (not counted)", flush=True)
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
        ft_tta = float(accuracy(*learner_tta(learn)))  # flip TTA, as the recipe reports it
    t_ft = time.perf_counter() - t0
    run["fine_tune"] = {"accuracy": ft_acc, "accuracy_tta": ft_tta, "valid_loss": ft_loss, "seconds": t_ft,
                        "epochs": n_epochs, "calibration_seconds": [t_fz, t_uf, t_tta]}
    return run


def _short(arch: str) -> str:
    return next((k for k, v in ARCH_ALIASES.items() if v == arch), arch)


def print_table(runs: list[dict]) -> None:
    print("\n| method | arch | px | valid accuracy | with TTA | wall time (s) | accuracy / min | training epochs |"
          "\n|---|---|---|---|---|---|---|---|")
    for r in runs:
        rec, ft = r["recipe"], r["fine_tune"]
        rows = [("fastlesson recipe (8 steps)", rec, f"{rec['epochs']}")]
        if ft is not None:
            rows.append((f"fastai fine_tune({ft['epochs']})", ft, f"1+{ft['epochs']}"))
        for name, d, ep in rows:
            tta = "-" if d["accuracy_tta"] is None else f"{100 * d['accuracy_tta']:.1f}%"
            print(f"| {name} | {_short(r['arch'])} | {r['size']} | {100 * d['accuracy']:.1f}% | {tta} | "
                  f"{d['seconds']:.0f} | {100 * d['accuracy'] / (d['seconds'] / 60):.1f}% | {ep} |")
    for r in (r for r in runs if r["recipe"]["budget"]):
        b = r["recipe"]["budget"]
        print(f"{_short(r['arch'])}: budget {b['budget_min']:g} min, actual {b['actual']['minutes']:.2f} min "
              f"({b['actual']['minutes'] / b['budget_min']:.2f} of it), step-8 cycles {b['planned']['full_cycles']}")
    for r in (r for r in runs if r["fine_tune"] is not None):
        rec, ft = r["recipe"], r["fine_tune"]
        tta_gap = ("" if ft["accuracy_tta"] is None
                   else f", {100 * (rec['accuracy_tta'] - ft['accuracy_tta']):+.1f} with TTA")
        print(f"{_short(r['arch'])}: recipe - fine_tune: {100 * (rec['accuracy'] - ft['accuracy']):+.1f} points"
              f"{tta_gap}, at {ft['seconds'] / rec['seconds']:.2f}x the recipe's time (TTA included); "
              f"recipe run: {r['res'].out / 'report.md'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"Udacity-layout folder [{DEFAULT_DATA}]")
    p.add_argument("--arch", nargs="+", default=[ARCH],
                   help=f"one or more of lite0 lite1 lite2 (or any fastlesson arch name) [{ARCH}]")
    p.add_argument("--size", default="160", help="input side in px, or 'native' (lite0 224, lite1 240, "
                                                 "lite2 260) [160]")
    p.add_argument("--bs", type=int, default=32, help="batch size [32]")
    p.add_argument("--opt", default="adam", help="recipe optimizer [adam]")
    p.add_argument("--epochs-max", type=int, default=7, help="recipe step 8 epoch bound [7]")
    p.add_argument("--head-cycles", type=int, default=2, help="recipe step 4: one-epoch SGDR cycles [2]")
    p.add_argument("--lr-find-iters", type=int, default=100, help="batches per recipe LR range test [100]")
    p.add_argument("--budget", type=float, help="recipe time budget in minutes (RecipeConfig.budget) [none]")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--recipe-only", action="store_true", help="no fastai fine_tune side (compare recipes)")
    p.add_argument("--limit", type=int, help="use only the first N images per class and split (quick check)")
    p.add_argument("--smoke", action="store_true", help="recipe in smoke mode (32 px, 1 epoch per step)")
    p.add_argument("--no-tta", action="store_true", help="no test-time augmentation on either side")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="folder for the recipe runs and bench.json [a temp folder]")
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    archs = [arch_name(n) for n in a.arch]
    for arch in archs:
        input_size(a.size, arch)  # a bad --size fails before the first long run
    data = resolve_data(a.data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    if a.limit:
        data = subsample(data, a.limit, tmp / "data")
    out = a.out or tmp / "run"
    runs = [run_pair(data, a, arch, out / _short(arch) if len(archs) > 1 else out) for arch in archs]

    info, cfg = runs[0]["data_info"], runs[0]["cfg"]
    print("\n" + env_summary(repeats=1))
    print(f"data: {data} ({info['n_valid']} valid images, {info['n_classes']} classes), bs {cfg.bs}, "
          f"recipe opt {cfg.opt}{f', recipe budget {a.budget:g} min' if a.budget else ''}")
    print_table(runs)
    summary = {_short(r["arch"]): {"recipe": r["recipe"], "fine_tune": r["fine_tune"], "size": r["size"],
                                   "config": {k: str(v) for k, v in vars(r["cfg"]).items()}} for r in runs}
    summary["env"] = env_summary(repeats=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    print(f"figures: {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
