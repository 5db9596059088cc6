"""The same training with 1 and 2 processes on CPU (torchrun, gloo, DDP through fastai + Accelerate), side by side.

    python bench/ddp.py                                  # flowers102-small, lite0, 160 px: ~6 min on 2 cores
    python bench/ddp.py --no-aug                         # no random augmentation: the runs should agree to float noise
    python bench/ddp.py --per-class 2 --size 64 --full-epochs 0   # a quick check of the script

Each run trains the same thing: tf_efficientnet_lite0 (ImageNet weights), the same data, split and global
batch (`--bs`, split evenly over the processes: bs/N per process), `--head-epochs` epochs of the head
(body frozen) then `--full-epochs` epochs with layer groups 1-2 unfrozen (10x lower LR per earlier group),
SGDR with one cycle per phase, the body's BatchNorm frozen and held (as the recipe does), the head's
BatchNorm synchronized over the processes (`--no-sync-bn`: per process, as before). Each process gets half of
every global batch (fastlesson.distributed.DistributedDL), so the 2-process run sees the same items per
optimizer step as the 1-process one; gradients are averaged, so only the augmentation draws and float
summation order differ. Printed: validation accuracy and loss (all validation images, gathered), training
time and images/s (training phases only), whether the weights are bitwise identical on both ranks, and
the largest weight difference between the 1- and 2-process models. On a 2-core machine no speed-up is
expected (2 processes x 1 thread vs 1 process x 2 threads); the point is equal accuracy and identical
weights across ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import ARCH, DEFAULT_DATA, REPO, env_summary, resolve_data, subsample  # noqa: E402

RUN_TIMEOUT_S = 3600  # one torchrun run, s


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"train/ + valid/ class folders [{DEFAULT_DATA}]")
    p.add_argument("--per-class", type=int, default=8,
                   help="images per class and split, train and valid (0: all; valid has ~8 a class) [8]")
    p.add_argument("--size", type=int, default=160, help="px [160]")
    p.add_argument("--bs", type=int, default=32, help="global batch, split over the processes [32]")
    p.add_argument("--head-epochs", type=int, default=1, help="epochs of the head, body frozen [1]")
    p.add_argument("--full-epochs", type=int, default=1, help="epochs with groups 1-2 unfrozen [1]")
    p.add_argument("--lr-head", type=float, default=2e-3, help="head LR of the first phase [2e-3]")
    p.add_argument("--lr-full", type=float, default=5e-4, help="head-group LR of the second phase [5e-4]")
    p.add_argument("--no-aug", action="store_true", help="no random augmentation (deterministic inputs)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm over the global batch under DDP (fastlesson's default; --no-sync-bn: each "
                        "process its own half batch's statistics) [on]")
    p.add_argument("--procs", default="1,2", help="process counts to compare [1,2]")
    p.add_argument("--seed", type=int, default=42)
    # internal: one process of a torchrun run
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.bs % 2:
        raise SystemExit(f"--bs={a.bs}: use an even global batch so 2 processes split it evenly")
    return a


# ----------------------------------------------------------------------------------------- one process


def hold(params) -> None:
    """No gradient for `params` (fastai's freeze keeps BatchNorm trainable: train_bn)."""
    for p in params:
        p.requires_grad_(False)


def _state_digest(model) -> str:
    """sha256 over every parameter and buffer, bit for bit."""
    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker(a: argparse.Namespace) -> None:
    """Train under distrib_ctx (one process: a plain fit); rank 0 writes the result JSON and weights."""
    import torch
    from fastai.callback.core import Callback
    from fastai.callback.progress import ProgressCallback
    from fastai.callback.training import BnFreeze, bn_types
    from fastai.torch_core import set_seed

    from fastlesson import distributed as ddp
    from fastlesson.data import load_data
    from fastlesson.models import create_learner
    from fastlesson.schedule import fit_sgdr, freeze, freeze_to, lr_groups

    class TrainClock(Callback):
        order = 0

        def __init__(self):
            self.seconds, self.items = 0.0, 0

        def before_train(self):
            ddp.barrier()
            self.t0 = time.perf_counter()

        def after_batch(self):
            if self.training:
                self.items += len(self.yb[0])

        def after_train(self):
            ddp.barrier()
            self.seconds += time.perf_counter() - self.t0

    n = ddp.init_distributed()
    set_seed(a.seed)
    data = load_data(a.data, size=a.size, bs=a.bs // n, seed=a.seed, aug=not a.no_aug, image_cache=False)
    learn = create_learner(data.dls, arch=ARCH, pretrained=True)
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, ProgressCallback)])
    learn.to_channelslast(use_amp=False)
    learn.model.to(memory_format=torch.channels_last)
    freeze(learn, verbose=False)
    body_bn = [p for m in learn.model[0].modules() if isinstance(m, bn_types) for p in m.parameters(recurse=False)]
    hold(body_bn)  # as the recipe does: BnFreeze then keeps the body's BatchNorm in eval mode throughout
    clock = TrainClock()
    t_all = time.perf_counter()
    with ddp.distrib_ctx(learn, sync_bn=a.sync_bn):
        ddp.seed_per_process(a.seed)
        if a.head_epochs:
            fit_sgdr(learn, n_cycles=1, cycle_len=a.head_epochs, lr_max=a.lr_head, cbs=[clock, BnFreeze()])
        if a.full_epochs:
            freeze_to(learn, 1, verbose=False)
            hold(body_bn)
            lrs = lr_groups(learn, a.lr_full, factor=10)
            fit_sgdr(learn, n_cycles=1, cycle_len=a.full_epochs, lr_max=lrs, cbs=[clock, BnFreeze()])
        preds, targs = learn.get_preds()
    seconds_all = time.perf_counter() - t_all
    loss = float(torch.nn.functional.nll_loss(preds.clamp_min(1e-12).log(), targs))  # preds: softmax
    digests = ddp.all_gather_object(_state_digest(learn.model))
    items = ddp.all_gather_object(clock.items)
    if ddp.is_main_process():
        out = Path(a.worker)
        torch.save({k: v.detach().cpu() for k, v in learn.model.state_dict().items()}, out.with_suffix(".pt"))
        res = {"processes": n, "threads": torch.get_num_threads(), "bs_per_process": a.bs // n, "global_bs": a.bs,
               "n_train": len(data.dls.train_ds), "n_valid": len(targs),
               "accuracy": float((preds.argmax(1) == targs).float().mean()), "valid_loss": loss,
               "train_seconds": clock.seconds, "train_items": sum(items), "seconds_total": seconds_all,
               "ranks_identical": len(set(digests)) == 1, "n_ranks": len(digests)}
        out.write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------- the comparison


def run(a: argparse.Namespace, data: Path, n: int, tmp: Path) -> dict:
    result = tmp / f"procs{n}.json"
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n)), "PYTHONPATH": str(REPO),
           "FASTLESSON_DIST_TIMEOUT_S": "600"}
    args = ["--data", str(data), "--size", a.size, "--bs", a.bs, "--head-epochs", a.head_epochs,
            "--full-epochs", a.full_epochs, "--lr-head", a.lr_head, "--lr-full", a.lr_full, "--seed", a.seed,
            *(["--no-aug"] if a.no_aug else []), "--sync-bn" if a.sync_bn else "--no-sync-bn", "--worker", result]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), *map(str, args)]
    print(f"\n$ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} torchrun --standalone --nproc_per_node={n} bench/ddp.py ...",
          flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{n}-process run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(result.read_text())
    res["wall_seconds"] = time.perf_counter() - t0
    res["weights"] = str(result.with_suffix(".pt"))
    return res


def _max_weight_diff(a: str, b: str) -> tuple[float, str, float, str]:
    """Largest |difference| over the floating-point tensors of two state_dicts and where it is; and the largest
    relative one (max |a - b| / max |a| per tensor: running variances are large numbers) and where."""
    import torch

    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    keys = [k for k in sa if sa[k].is_floating_point()]
    diffs = {k: float((sa[k].double() - sb[k].double()).abs().max()) for k in keys}
    rel = {k: diffs[k] / max(float(sa[k].double().abs().max()), 1e-12) for k in keys}
    k, kr = max(diffs, key=diffs.get), max(rel, key=rel.get)
    return diffs[k], k, rel[kr], kr


def main(argv=None) -> None:
    a = parse(argv)
    if a.worker:
        worker(a)
        return
    procs = [int(x) for x in a.procs.split(",")]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        data = resolve_data(a.data)
        if a.per_class:
            data = subsample(data, a.per_class, tmp / "data")
        results = [run(a, data, n, tmp) for n in procs]
        diff, where, rel, rel_where = (_max_weight_diff(results[0]["weights"], results[-1]["weights"])
                                       if len(results) > 1 else (0.0, "", 0.0, ""))
    print(f"\nDDP on CPU: {ARCH}, {a.size} px, global batch {a.bs}, {a.head_epochs} head + {a.full_epochs} "
          f"unfrozen epoch(s), augmentation {'off' if a.no_aug else 'on'}, "
          f"BatchNorm {'synchronized over the processes' if a.sync_bn else 'per process'}, "
          f"{results[0]['n_train']} train / {results[0]['n_valid']} valid images")
    print(f"{'processes':>9} {'threads':>7} {'bs/proc':>7} {'accuracy':>8} {'val loss':>8} {'train s':>8} "
          f"{'img/s':>7} {'wall s':>7}  weights identical on all ranks")
    for r in results:
        ips = r["train_items"] / r["train_seconds"] if r["train_seconds"] else float("nan")
        same = f"yes ({r['n_ranks']} ranks)" if r["ranks_identical"] else "NO"
        print(f"{r['processes']:>9} {r['threads']:>7} {r['bs_per_process']:>7} {100 * r['accuracy']:>7.1f}% "
              f"{r['valid_loss']:>8.4f} {r['train_seconds']:>8.1f} {ips:>7.1f} {r['wall_seconds']:>7.1f}  {same}")
    if len(results) > 1:
        r1, rn = results[0], results[-1]
        print(f"accuracy difference {100 * (rn['accuracy'] - r1['accuracy']):+.1f} points; img/s ratio "
              f"{(rn['train_items'] / rn['train_seconds']) / (r1['train_items'] / r1['train_seconds']):.2f}x; "
              f"largest |weight difference| between the {r1['processes']}- and {rn['processes']}-process models "
              f"{diff:.2e} ({where}); largest relative {rel:.1%} ({rel_where})")
    print(env_summary(repeats=1))


if __name__ == "__main__":
    main()
