"""Sweep small_cnn hyperparameters (or optimizers) and write a table, a CSV and loss plots.

    python scripts/sweep.py --data cifar10 --grid bench/sweep_grid.yaml --out runs/sweep
    python scripts/sweep.py --data cifar10 --lr 1e-3 3e-3 --channels 32,64 64,128 --opt adam radam
    python scripts/sweep.py --smoke --out /tmp/smoke     # 2 configurations on tiny synthetic images

The same command as the installed `fastlesson-sweep`; the options come from SweepConfig's fields
(fastlesson/cli.py builds them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from fastlesson.cli import sweep_main  # noqa: E402

main = sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main(prog="scripts/sweep.py"))
