"""Step 8's SGDR snapshots: the recipe's restored best weights vs averages of the cycle-end weights.

    python bench/snapshots.py                      # flowers102-small, lite0, 160 px, --budget 12 (~13 min)
    python bench/snapshots.py --progressive 128 --seed 1
    python bench/snapshots.py --budget 3 --limit 3 --size 64 --lr-find-iters 24   # a quick check (~1 min)

One recipe run (`fastlesson.run_recipe`, the given budget and seed) that also keeps a copy of the weights
at the end of every step-8 SGDR cycle (where the cosine LR has annealed: the snapshots of Huang et al.
2017, "Snapshot ensembles"). Then, on the validation split, side by side:

- the recipe's own result (the best validated cycle end, restored);
- the weights averaged over the last k cycle ends (what `RecipeConfig.average_cycles = k` keeps
  when it validates better than the best cycle end; stochastic weight averaging over SGDR snapshots,
  Izmailov et al. 2018, an equal-weight average; the body's BatchNorm is frozen
  with ImageNet statistics in step 8, so an average needs no BatchNorm re-estimation there);
- the softmax averaged over the last k snapshots (an ensemble: k forward passes per image);
- the weights averaged over the last k epoch ends of step 8 (`--epoch-ends`: mid-cycle weights too,
  where the LR has not annealed).

Accuracy without and with flip TTA, and the validation loss. A weight average costs a copy of the
weights per cycle and nothing at prediction time; an ensemble costs k passes per image.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import ARCH, DEFAULT_DATA, env_summary, resolve_data, subsample  # noqa: E402


def predictions(learn, state: dict) -> tuple:
    """(softmax, flip-TTA softmax, targets) on the validation split with the weights `state`."""
    import torch

    from fastlesson.callbacks import state_copy
    from fastlesson.export import learner_tta

    keep = state_copy(learn.model)
    learn.model.load_state_dict(state)
    plain, targs = learn.get_preds(dl=learn.dls.valid, act=lambda x: x.float().softmax(-1))
    tta, _ = learner_tta(learn)
    learn.model.load_state_dict(keep)
    return plain.as_subclass(torch.Tensor), tta, targs.as_subclass(torch.Tensor)


def scores(preds: list[tuple]) -> dict:
    """Accuracy (plain and flip TTA) and NLL of the mean softmax of `preds` (one entry: one model)."""
    import torch

    targs = preds[0][2]
    p, t = torch.stack([q[0] for q in preds]).mean(0), torch.stack([q[1] for q in preds]).mean(0)
    nll = float(torch.nn.functional.nll_loss(p.clamp_min(1e-12).log(), targs))
    return {"accuracy": float((p.argmax(1) == targs).float().mean()),
            "accuracy_tta": float((t.argmax(1) == targs).float().mean()), "nll": nll}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"image folder [{DEFAULT_DATA}]")
    p.add_argument("--budget", type=float, default=12.0, help="minutes [12]")
    p.add_argument("--size", type=int, default=160, help="px [160]")
    p.add_argument("--seed", type=int, default=42, help="[42]")
    p.add_argument("--progressive", type=int, default=None, help="RecipeConfig.progressive [off]")
    p.add_argument("--lr-find-iters", type=int, default=100, help="batches per LR range test [100]")
    p.add_argument("--limit", type=int, default=None, help="images per class and split (quick check)")
    p.add_argument("--epoch-ends", type=int, default=6,
                   help="also average the last k = 2..K epoch ends of step 8 (mid-cycle weights too) [6; 0: off]")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    import fastlesson.recipe as recipe
    from fastlesson.callbacks import average_states, state_copy
    from fastlesson.precompute import clear_memory_cache

    snaps: list[dict] = []
    after = recipe._after_full_cycle

    def keeping(state, n_passes):  # the recipe's own hook, after each step-8 cycle's validation
        snaps.append(state_copy(state.learn.model))
        return after(state, n_passes)

    recipe._after_full_cycle = keeping
    epochs: list[dict] = []  # every step-8 training epoch's end (--epoch-ends)
    full_sgdr = dict(recipe.STEPS)["full_sgdr"]

    def keeping_epochs(state):
        from fastai.callback.core import Callback

        class EpochEnds(Callback):
            order = 100

            def after_epoch(self):
                epochs.append(state_copy(self.learn.model))

        cb = EpochEnds()
        state.learn.add_cb(cb)
        try:
            return full_sgdr(state)
        finally:
            state.learn.remove_cb(cb)

    if args.epoch_ends:
        recipe.STEPS[:] = [(n, keeping_epochs if n == "full_sgdr" else f) for n, f in recipe.STEPS]
    data = resolve_data(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        if args.limit:
            data = subsample(data, args.limit, Path(tmp) / "data")
        cfg = recipe.RecipeConfig(data=str(data), arch=ARCH, size=args.size, seed=args.seed, out=str(Path(tmp) / "run"),
                                  budget=args.budget, lr_find_iters=args.lr_find_iters, progressive=args.progressive,
                                  average_cycles=1)  # the recipe's own row: its best cycle end, not averaged
        clear_memory_cache()
        res = recipe.run_recipe(cfg)
        learn = res.learn
        full = next(s for s in res.steps if s["name"] == "full_sgdr")
        rows = [{"what": f"recipe: best cycle end restored (epoch {full['best_epoch']} of {full['epochs']})",
                 **scores([predictions(learn, state_copy(learn.model))])}]
        each = [predictions(learn, s) for s in snaps]  # one pass set per snapshot; ensembles reuse them
        rows += [{"what": f"cycle {i + 1} end", **scores([q])} for i, q in enumerate(each)]
        for k in range(2, len(snaps) + 1):
            rows.append({"what": f"weights averaged over the last {k} cycle ends",
                         **scores([predictions(learn, average_states(snaps[-k:]))])})
            rows.append({"what": f"ensemble of the last {k} cycle ends ({k} passes)", **scores(each[-k:])})
        for k in range(2, min(args.epoch_ends, len(epochs)) + 1):
            rows.append({"what": f"weights averaged over the last {k} epoch ends",
                         **scores([predictions(learn, average_states(epochs[-k:]))])})
    print(f"\n## Step 8's snapshots: {args.data}{f' (limit {args.limit})' if args.limit else ''}, {ARCH}, "
          f"{args.size} px, budget {args.budget:g} min, seed {args.seed}, progressive {args.progressive}; "
          f"cycles {full.get('cycles')} ({full.get('epochs')} epochs), run {res.metrics['seconds_total'] / 60:.2f} min\n")
    print("| weights | accuracy | with flip TTA | valid NLL |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {100 * r['accuracy']:.1f}% | {100 * r['accuracy_tta']:.1f}% | {r['nll']:.3f} |")
    print("\n" + env_summary(repeats=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
