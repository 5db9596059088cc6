"""One process of the two-process CPU runs in test_distributed.py (started there through torchrun).

    torchrun --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR [train|kill|stall]
    torchrun --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR recipe DATA_DIR RUN_DIR
    torchrun --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR recipe-kill|recipe-resume DATA_DIR RUN_DIR
    torchrun --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR syncbn

Trains the tiny 3-group CNN of _tiny.py inside ``distrib_ctx``: find_lr, the head on precomputed
activations (with an on-disk cache), SGDR with fastlesson's EarlyStopping and NonFiniteGuard, then
get_preds. Each process writes what it saw to OUT_DIR/rank<r>.json and its weights to rank<r>.pt (test
outputs, outside the watched folder). An audit hook records every file the process creates or renames
under OUT_DIR/watched, where the library writes (the precompute cache). Mode ``kill``: rank 1 kills
itself (SIGKILL) in the second batch of SGDR training; ``stall``: it sleeps there instead. Mode
``recipe``: ``scripts/recipe.py --smoke`` on DATA_DIR into RUN_DIR, the audit hook watching RUN_DIR; each
process writes its exit status and what it wrote to OUT_DIR/rank<r>.json. ``recipe-kill``: run_recipe
with two SGDR cycles in step 8, rank 1 SIGKILLs itself once the checkpoint after the first is written;
``recipe-resume``: resume_recipe(RUN_DIR) under two processes. Mode ``syncbn``: BatchNorm synchronized over
the processes (``_to_sync_bn``) against one process's plain BatchNorm on the whole batch: outputs, input and
parameter gradients, running statistics; each process writes the largest differences to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback

from fastlesson import distributed as fd
from fastlesson.callbacks import EarlyStopping, NonFiniteGuard
from fastlesson.distributed import (
    distrib_ctx,
    init_distributed,
    rank,
    teardown_distributed,
    world_size,
)
from fastlesson.finder import find_lr
from fastlesson.precompute import clear_memory_cache, precompute_head, precompute_learner
from fastlesson.schedule import fit_sgdr

from _tiny import make_tiny_learner, synthetic_dsets

N_TRAIN, N_VALID, BS = 64, 32, 8  # items, items, items per process and batch


def _watch(root: Path, events: list) -> None:
    """Record file creations/renames/removals under `root` (Python-level, which atomic_write goes through)."""
    root_s = str(root.resolve())

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [args[0]] if writes else []
        elif event in ("os.rename", "os.remove", "os.mkdir"):
            paths = [a for a in args[:2] if isinstance(a, (str, os.PathLike))]
        else:
            return
        for p in paths:
            if str(Path(os.fspath(p)).absolute()).startswith(root_s):
                events.append(f"{event} {os.fspath(p)}")

    sys.addaudithook(hook)


class SeenItems(Callback):
    """Per training epoch, the fingerprint (sum of pixels) of every item this process trained on."""

    order, run_valid = 0, False

    def __init__(self):
        self.epochs = []

    def before_train(self):
        self.epochs.append([])

    def before_batch(self):
        self.epochs[-1] += self.xb[0].detach().sum((1, 2, 3)).tolist()


class Rank1Fails(Callback):
    """At its second training batch rank 1 dies (SIGKILL, no cleanup) or stalls (sleeps for 10 minutes)."""

    def __init__(self, how: str):
        self.how = how

    def before_batch(self):
        if self.training and rank() == 1 and self.iter == 1:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)


def _indices(sums: list, ref: torch.Tensor) -> list:
    """Map item fingerprints back to dataset indices (nearest; the distance is checked in the test)."""
    s = torch.tensor(sums, dtype=ref.dtype)
    return (s[:, None] - ref[None]).abs().argmin(1).tolist()


def main(out: Path, mode: str) -> None:
    watched = out / "watched"
    events: list = []
    _watch(watched, events)
    init_distributed()
    r = rank()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    learn = make_tiny_learner(n_train=N_TRAIN, n_valid=N_VALID, bs=BS)
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, ProgressCallback)])  # quiet logs
    train_ds, _ = synthetic_dsets(N_TRAIN, N_VALID)
    ref_sums = train_ds.tensors[0].sum((1, 2, 3))
    seen = SeenItems()
    with torch.no_grad():  # the body pass in one process over all the data, for the gathered shards
        ref_x = learn.model[0].eval()(train_ds.tensors[0])
    learn.model.train()
    n_body = [0]
    with distrib_ctx(learn):
        lrf = find_lr(learn, num_it=30)
        clear_memory_cache()
        hook = learn.model[0].register_forward_hook(lambda m, i, o: n_body.__setitem__(0, n_body[0] + len(i[0])))
        head_learn = precompute_learner(learn, cache_dir=watched / "cache", bs=BS)
        hook.remove()
        head = precompute_head(learn, 1, lr_max=1e-2, head_learn=head_learn)
        learn.add_cb(seen)
        es = EarlyStopping(patience=5, restore_best_weights=True)
        extra = [Rank1Fails(mode)] if mode in ("kill", "stall") else []
        fit_sgdr(learn, n_cycles=2, cycle_len=1, cycle_mult=1, lr_max=1e-2, cbs=[es, NonFiniteGuard(), *extra])
        preds, targs = learn.get_preds()
    torch.save({k: v.detach().cpu() for k, v in learn.model.state_dict().items()}, out / f"rank{r}.pt")
    seen_idx = [_indices(ep, ref_sums) for ep in seen.epochs]
    seen_err = max(float((torch.tensor(ep) - ref_sums[idx]).abs().max()) for ep, idx in zip(seen.epochs, seen_idx))
    report = {
        "rank": r, "world_size": world_size(), "lr": lrf.suggestion, "lr_losses": lrf.losses.tolist(),
        "lr_stop": lrf.stop_reason, "seen": seen_idx, "seen_match_err": seen_err, "n_body_items": n_body[0],
        "features_close": bool(torch.allclose(head_learn.features.train_x, ref_x, atol=1e-5)),
        "n_features": len(head_learn.features.train_x), "head_accuracy": head.accuracy,
        "n_preds": len(preds), "targets": targs.tolist(), "preds_sum": float(preds.sum()),
        "es_best_epoch": es.best_epoch, "events": events,
    }
    (out / f"rank{r}.json").write_text(json.dumps(report))
    teardown_distributed()


def recipe(out: Path, data: str, run: Path) -> None:
    """scripts/recipe.py --smoke, as torchrun starts it in every process."""
    events: list = []
    _watch(run, events)
    sys.argv = ["scripts/recipe.py", "--data", data, "--smoke", "--out", str(run)]
    try:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "recipe.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    (out / f"rank{rank()}.json").write_text(json.dumps({"rank": rank(), "exit": code, "events": events}))
    sys.exit(code)


RESUME_CFG = dict(size=32, bs=8, epochs_max=3, precompute_epochs=1, head_cycles=1, lr_find_iters=32,
                  top_losses=4, seed=3)  # smoke-sized, two SGDR cycles in step 8 (1 + 2 epochs)


def recipe_resume(out: Path, mode: str, data: str, run: Path) -> None:
    """Kill rank 1 after step 8's first cycle is checkpointed, or resume that run, both data-parallel."""
    from fastlesson import distributed as ddp
    from fastlesson import recipe as rc

    events: list = []
    _watch(run, events)
    if mode == "recipe-kill":
        checkpoint = rc._checkpoint

        def then_die(state, after):
            checkpoint(state, after)
            if after == "full_sgdr" and state.progress is not None and state.progress.cycles >= 1:
                ddp.barrier()  # rank 0 has written the checkpoint
                if rank() == 1:
                    (out / "rank1-killed").touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                ddp.barrier()  # rank 0 waits here until torchrun stops it

        rc._checkpoint = then_die
        rc.run_recipe(rc.RecipeConfig(data=data, out=str(run), **RESUME_CFG))
    else:
        res = rc.resume_recipe(run)
        (out / f"rank{rank()}.json").write_text(json.dumps(
            {"rank": rank(), "events": events, "accuracy": res.accuracy, "resumed": res.metrics["resumed"],
             "distributed": res.metrics["distributed"]}))


def syncbn(out: Path) -> None:
    """Two steps: an even split with a mean loss (what DDP trains: local means, gradients averaged), then an
    uneven one (5 and 11 rows) with a sum loss; then an eval pass on the running statistics."""
    import copy

    import torch.distributed as dist
    from torch import nn

    init_distributed()
    r, n = rank(), world_size()
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6, momentum=None))  # None: a cumulative average
    ours = copy.deepcopy(ref)
    ours[0].to(memory_format=torch.channels_last)
    layers = fd._to_sync_bn(ours)
    err: dict = {"n_layers": len(layers)}

    def worst(key, a, b):
        err[key] = max(err.get(key, 0.0), float((a - b).detach().abs().max()))

    for step, (cuts, reduce) in enumerate([([8, 8], "mean"), ([5, 11], "sum")]):
        x = torch.randn(16, 3, 8, 8) * (2 + step) + 1  # the same global batch on every process
        y = torch.randn(16, 6)
        for m in (ref, ours):
            m.zero_grad()
        xr = x.clone().requires_grad_()
        out_ref = ref(xr)
        getattr((out_ref - y) ** 2, reduce)().backward()
        lo, hi = sum(cuts[:r]), sum(cuts[:r + 1])
        xo = x[lo:hi].clone().to(memory_format=torch.channels_last).requires_grad_()
        y_ours = ours(xo)
        getattr((y_ours - y[lo:hi]) ** 2, reduce)().backward()
        k = n if reduce == "mean" else 1  # the global mean is the mean of the processes' means
        for p in ours.parameters():  # what DDP does: average (mean loss) the processes' gradients
            dist.all_reduce(p.grad)
            p.grad /= k
        worst("out", y_ours, out_ref[lo:hi])
        worst("grad_x", xo.grad, xr.grad[lo:hi] * k)
        for pr, po in zip(ref.parameters(), ours.parameters()):
            worst("grad_params", po.grad, pr.grad)
        for br, bo in zip(ref.buffers(), ours.buffers()):
            worst("running_stats", bo.double(), br.double())
    ref.eval(), ours.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        worst("eval_out", ours(x), ref(x))
    fd._restore_bn(layers)
    err["restored"] = not any("forward" in m.__dict__ for m in ours.modules())
    (out / f"rank{r}.json").write_text(json.dumps(err))
    teardown_distributed()


def _dump_stacks_on_sigterm(out: Path) -> None:
    """When torchrun stops this process (another one failed), its Python stack goes to
    OUT_DIR/stack-rank<r>.txt: a failed test then shows where every process was, not only the failed one."""
    import faulthandler

    f = open(out / f"stack-rank{os.environ.get('RANK', '0')}.txt", "w")  # noqa: SIM115 - kept open for the handler
    faulthandler.register(signal.SIGTERM, file=f, all_threads=True, chain=True)


if __name__ == "__main__":
    _dump_stacks_on_sigterm(Path(sys.argv[1]))
    if sys.argv[2:3] == ["recipe"]:
        recipe(Path(sys.argv[1]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[2:3] == ["syncbn"]:
        syncbn(Path(sys.argv[1]))
    elif sys.argv[2].startswith("recipe-"):
        recipe_resume(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "train")
