"""The recipe with a time budget: planned vs actual minutes and accuracy, next to the default run.

    python bench/budget.py                                  # flowers102-small, lite0, 160 px: default,
                                                            # --budget 6, --budget 12 (~30 min on 2 cores)
    python bench/budget.py --budgets 3 --limit 3 --size 64 --lr-find-iters 24 --skip-default
                                                            # a quick check of the script (~2 min)
    python bench/budget.py --budgets 12 --skip-default --label-smoothing 0 0.1 [--seed 1]
                                                            # label smoothing vs none, same budget
                                                            # and seed (~25 min)
    python bench/budget.py --budgets 12 --skip-default --budget-cycles doubling long [--seed 1]
                                                            # step 8 as SGDR cycles 1, 2, 4, ... vs
                                                            # 1 epoch then one long cycle (~25 min)
    python bench/budget.py --budgets 12 --skip-default --progressive none 128 [--seed 1]
                                                            # step 8 all at 160 px vs its cycles before
                                                            # the last at 128 px (~25 min)
    python bench/budget.py --budgets 12 --skip-default --average-cycles 1 2 [--seed 1]
                                                            # step 8 ends on its best cycle end vs the
                                                            # average of its last 2 (~25 min)

Each run is `fastlesson.run_recipe` in this process, one after another, on the same data and seed.
Printed per run: budget, planned minutes (the step-8 plan), actual minutes (the whole run, export
included), step-8 cycles planned/run, validation accuracy (and with TTA), and actual / budget.
Target (issue 12): actual within 10% of the budget, never more than 10% over; --budget 12 at least as
accurate as the default run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import ARCH, DEFAULT_DATA, env_summary, resolve_data, subsample  # noqa: E402


def run_one(data: Path, out: Path, budget: float | None, args, label_smoothing: float, rule: str,
            progressive: int | None = None, average: int = 1) -> dict:
    """One recipe run; its numbers for the table."""
    from fastlesson.precompute import clear_memory_cache
    from fastlesson.recipe import RecipeConfig, run_recipe

    cfg = RecipeConfig(data=str(data), arch=ARCH, size=args.size, seed=args.seed, out=str(out), budget=budget,
                       lr_find_iters=args.lr_find_iters, tta=not args.no_tta, label_smoothing=label_smoothing,
                       budget_cycles=rule, progressive=progressive, average_cycles=average)
    clear_memory_cache()  # every run pays its own body pass, as a fresh command would
    res = run_recipe(cfg)
    b = res.metrics.get("budget") or {}
    full = next(s for s in res.steps if s["name"] == "full_sgdr")
    return {"budget_min": budget, "label_smoothing": label_smoothing, "budget_cycles": rule,
            "progressive": progressive, "progressive_epochs": full.get("progressive_epochs", 0),
            "average_cycles": average, "averaged_kept": full.get("averaged_kept"),
            "planned_min": (b.get("planned") or {}).get("minutes"),
            "actual_min": round(res.metrics["seconds_total"] / 60, 2),
            "cycles_planned": (b.get("planned") or {}).get("full_cycles"),
            "cycles_run": full["cycles"], "epochs_run": full["epochs"], "accuracy": res.accuracy,
            "accuracy_tta": res.accuracy_tta}


def _px(r: dict) -> str:
    if not r.get("progressive"):
        return "-"
    return f"{r['progressive']} px" + (f" ({r['progressive_epochs']} ep)" if "progressive_epochs" in r else "")


def _avg(r: dict) -> str:
    if r.get("average_cycles", 1) < 2:
        return "-"
    kept = r.get("averaged_kept")
    return f"last {r['average_cycles']}" + ("" if kept is None else " (kept)" if kept else " (not better)")


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return (f"| {r['budget_min']:g} | {r['label_smoothing']:g} | {r['budget_cycles']} | {_px(r)} | "
                f"{_avg(r)} | refused: {r['error']} | | | | | | |")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    budget = "default" if r["budget_min"] is None else f"{r['budget_min']:g}"
    planned = "-" if r["planned_min"] is None else f"{r['planned_min']:.2f}"
    ratio = "-" if r["budget_min"] is None else f"{r['actual_min'] / r['budget_min']:.2f}"
    return (f"| {budget} | {r['label_smoothing']:g} | {r['budget_cycles']} | {_px(r)} | {_avg(r)} | {planned} | "
            f"{r['actual_min']:.2f} | {ratio} | "
            f"{r['cycles_planned'] or '-'} | "
            f"{r['cycles_run']} ({r['epochs_run']} ep) | {pct(r['accuracy'])} | {pct(r['accuracy_tta'])} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"image folder [{DEFAULT_DATA}]")
    p.add_argument("--budgets", type=float, nargs="+", default=[6.0, 12.0], help="minutes [6 12]")
    p.add_argument("--size", type=int, default=160, help="px [160]")
    p.add_argument("--seed", type=int, default=42, help="[42]")
    p.add_argument("--lr-find-iters", type=int, default=100, help="batches per LR range test [100]")
    p.add_argument("--limit", type=int, default=None, help="images per class and split (quick check)")
    p.add_argument("--skip-default", action="store_true", help="leave out the run without a budget")
    p.add_argument("--no-tta", action="store_true", help="no TTA accuracy (and no TTA time)")
    p.add_argument("--label-smoothing", type=float, nargs="+", default=None,
                   help="run each budget once per value (fastai's label-smoothing cross-entropy eps) "
                        "[the recipe's default]")
    p.add_argument("--budget-cycles", nargs="+", default=None, choices=["doubling", "long"],
                   help="run each budget once per rule for step 8's cycles (RecipeConfig.budget_cycles) "
                        "[the recipe's default]")
    p.add_argument("--progressive", nargs="+", default=None, type=lambda v: None if v == "none" else int(v),
                   help="run each budget once per value of RecipeConfig.progressive: px of step 8's cycles before "
                        "the last, or none [the recipe's default]")
    p.add_argument("--average-cycles", nargs="+", default=None, type=int,
                   help="run each budget once per value of RecipeConfig.average_cycles (1: off) [the recipe's default]")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--keep", default=None, help="write the run folders here (kept) instead of a temporary folder")
    args = p.parse_args(argv)
    from fastlesson.recipe import RecipeConfig

    data = resolve_data(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.limit:
            data = subsample(data, args.limit, Path(tmp) / "data")
        for budget in ([] if args.skip_default else [None]) + list(args.budgets):
            for ls, rule, px, avg in itertools.product(args.label_smoothing or [RecipeConfig.label_smoothing],
                                                       args.budget_cycles or [RecipeConfig.budget_cycles],
                                                       args.progressive or [RecipeConfig.progressive],
                                                       args.average_cycles or [RecipeConfig.average_cycles]):
                name = ("default" if budget is None else f"budget{budget:g}") + (f"_ls{ls:g}" if ls else "") \
                    + f"_{rule}" + (f"_px{px}" if px else "") + f"_avg{avg}"
                try:
                    rows.append(run_one(data, Path(args.keep or tmp) / name, budget, args, ls, rule, px, avg))
                except ValueError as e:  # a budget too short for this machine: said before any training
                    print(f"\n{name}: {e}")
                    rows.append({"budget_min": budget, "label_smoothing": ls, "budget_cycles": rule,
                                 "progressive": px, "average_cycles": avg, "error": str(e)})
    print("\n## Time budget vs the default run\n")
    print(f"data {args.data}{f' (limit {args.limit})' if args.limit else ''}, {ARCH}, {args.size} px, "
          f"seed {args.seed}\n")
    print("| budget (min) | label smoothing | step-8 cycles rule | progressive | averaged cycle ends | planned (min) | "
          "actual (min) | actual / budget | step-8 cycles planned | run | accuracy | with TTA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_fmt_row(r))
    print("\n" + env_summary(repeats=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
