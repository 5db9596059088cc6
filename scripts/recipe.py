"""Train an image classifier with the fast.ai lesson-2 recipe, export it, and write a report.

The eight steps: data + pretrained backbone; LR range test; head on precomputed activations; head
with augmentation (SGDR, cycle_len=1); unfreeze; discriminative LRs; LR range test again; full
network with SGDR (cycle_mult=2) until validation loss stops improving, keeping the best weights.

    python scripts/recipe.py                        # offline default: shipped flower sample, CPU, minutes
    python scripts/recipe.py --data flowers --opt lookahead-radam
    python scripts/recipe.py --data ../shared/data/flowers102-small --size 160 --out runs/flowers
    python scripts/recipe.py --smoke --out /tmp/smoke   # seconds-long run with every step and output

Outputs in --out: report.md (open it), metrics.json, history.csv, config.json, PNG plots, and the
model as a safe bundle (model.safetensors + model.json, for scripts/predict.py) and fastai's export.pkl.
"""

from __future__ import annotations

import argparse
import sys

from fastlesson.models import WeightsUnavailableError
from fastlesson.optim import OPTIMIZERS
from fastlesson.recipe import RecipeConfig, run_recipe


def parse_args(argv=None) -> RecipeConfig:
    """Command line -> RecipeConfig (defaults come from the dataclass)."""
    d = RecipeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=d.data,
                   help=f"sample (shipped, offline), flowers, cifar10, cifar100, or a folder of class "
                        f"folders (train/ + valid/, Udacity flower_data, or one folder split at random) "
                        f"[{d.data}]")
    p.add_argument("--arch", default=d.arch,
                   help=f"torchvision or timm model name; tf_efficientnet_lite0 has offline ImageNet "
                        f"weights [{d.arch}]")
    p.add_argument("--size", type=int, default=d.size, help=f"input side in pixels [{d.size}]")
    p.add_argument("--bs", type=int, default=d.bs, help=f"batch size [{d.bs}]")
    p.add_argument("--opt", default=d.opt, choices=OPTIMIZERS, help=f"optimizer [{d.opt}]")
    p.add_argument("--epochs-max", type=int, default=d.epochs_max,
                   help=f"most epochs for step 8 (SGDR cycles of 1, 2, 4, ... epochs) [{d.epochs_max}]")
    p.add_argument("--lr-factor", type=float, default=d.lr_factor,
                   help=f"step 6: each earlier layer group trains this many times slower (the lesson: 3-10) "
                        f"[{d.lr_factor:g}]")
    p.add_argument("--freeze-to", type=int, default=d.freeze_to,
                   help=f"step 5 unfreezes layer groups from this one on: 0 = every layer, 1 keeps the early "
                        f"body frozen (faster, and better on small data sets) [{d.freeze_to}]")
    p.add_argument("--train-bn", action="store_true",
                   help="let the body's BatchNorm layers train in steps 7-8 (default: kept in eval mode with "
                        "their ImageNet statistics, fastai v0.7's bn_freeze)")
    p.add_argument("--valid-every-epoch", action="store_true",
                   help="step 8: validate after every epoch (default: at the end of each SGDR cycle only, "
                        "the snapshots it compares; a mid-cycle pass costs ~20%% of a CPU epoch)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed [{d.seed}]")
    p.add_argument("--out", default=None, help="output folder [runs/<data>-<arch>-<YYYYmmdd-HHMMSS>]")
    p.add_argument("--no-precompute", action="store_true",
                   help="train the head in step 3 with full forward passes instead of cached activations")
    p.add_argument("--no-pretrained", action="store_true", help="train the backbone from scratch")
    p.add_argument("--hard-mining", type=float, default=None, metavar="FRACTION",
                   help="up-weight (x2) this fraction of the highest-loss images of each batch, e.g. 0.25")
    p.add_argument("--no-tta", action="store_true", help="skip the test-time-augmentation accuracy")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run (32 px, 1 epoch per step) that still makes every output; for tests")
    a = p.parse_args(argv)
    return RecipeConfig(data=a.data, arch=a.arch, size=a.size, bs=a.bs, opt=a.opt, epochs_max=a.epochs_max,
                        lr_factor=a.lr_factor, freeze_to=a.freeze_to, bn_freeze=not a.train_bn,
                        valid_every_epoch=a.valid_every_epoch, seed=a.seed,
                        out=a.out, precompute=not a.no_precompute,
                        pretrained=not a.no_pretrained, hard_mining=a.hard_mining, tta=not a.no_tta,
                        smoke=a.smoke)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        run_recipe(cfg)
    except (ValueError, FileNotFoundError, WeightsUnavailableError) as e:  # bad input: one clear line, not a traceback wall
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
