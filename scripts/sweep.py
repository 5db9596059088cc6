"""Sweep small_cnn hyperparameters (or optimizers) and write a table, a CSV and loss plots.

    python scripts/sweep.py --data cifar10 --grid bench/sweep_grid.yaml --out runs/sweep
    python scripts/sweep.py --data cifar10 --lr 1e-3 3e-3 --channels 32,64 64,128 --opt adam radam
    python scripts/sweep.py --smoke --out /tmp/smoke     # 2 configurations on tiny synthetic images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fastlesson.sweep import GRID_KEYS, SMOKE_GRID, make_smoke_data, normalize_grid, run_sweep


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="load_data source: cifar10, cifar100 or an image folder")
    p.add_argument("--grid", type=Path, help="YAML file mapping grid keys to lists of values")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output folder (resumes there)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--limit", type=int, help="use only the first N images per class and split")
    p.add_argument("--no-aug", action="store_true", help="no pad-crop/flip augmentation (overfits sooner)")
    p.add_argument("--smoke", action="store_true", help="2 configurations on tiny data, seconds on CPU")
    for key, kind, helptext in [("lr", float, "peak learning rates"), ("bs", int, "batch sizes"),
                                ("epochs", int, "epoch counts"),
                                ("channels", str, "feature maps per VGG block, e.g. 32,64 64,128"),
                                ("fc", str, "hidden FC sizes, e.g. 1024 512,256 none"),
                                ("dropout", float, "dropout after each hidden FC layer"),
                                ("opt", str, "optimizers: sgd adam radam lookahead-radam ranger")]:
        p.add_argument(f"--{key}", nargs="+", type=kind, help=helptext)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    grid = {}
    if args.grid:
        if not args.grid.is_file():
            raise FileNotFoundError(f"--grid {args.grid}: no such file; see bench/sweep_grid.yaml")
        grid = yaml.safe_load(args.grid.read_text()) or {}
        if not isinstance(grid, dict):
            raise ValueError(f"--grid {args.grid}: expected a mapping of grid keys {list(GRID_KEYS)} to lists")
    if args.smoke:
        grid = {**SMOKE_GRID, **grid}
    grid.update({k: getattr(args, k) for k in GRID_KEYS if getattr(args, k) is not None})
    normalize_grid(grid)  # a bad key or value fails before smoke data or outputs are written
    data, size = args.data, args.size
    if args.smoke and data is None:
        data, size = make_smoke_data(args.out / "smoke-data", size=16), 16
    if data is None:
        raise ValueError("--data is required (cifar10, cifar100 or an image folder), or use --smoke")
    result = run_sweep(grid, data, args.out, seed=args.seed, size=size, limit=args.limit,
                       aug=not args.no_aug)
    print(f"\n{result.files['table'].read_text()}\ntrained {result.trained}, resumed {result.resumed}; "
          f"table {result.files['table']}, CSV {result.files['csv']}, plots {result.files['plots']}")


if __name__ == "__main__":
    main()
