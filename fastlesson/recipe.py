"""The fast.ai lesson-2 recipe, end to end: `run_recipe(RecipeConfig(...)) -> RecipeResult`.

The eight steps (DESIGN.md), each printed with a header and a one-line result:
 1. data with augmentation and a pretrained backbone        5. unfreeze (all but the early body)
 2. LR range test (frozen body)                             6. discriminative LRs (10x per group)
 3. train the head on precomputed activations               7. LR range test again (unfrozen)
 4. train the head with augmentation (SGDR, cycle_len=1)    8. full network, SGDR cycle_mult=2, until
                                                               validation loss stops improving
Outputs go to `cfg.out`: config.json, metrics.json, history.csv, PNG plots, report.md, the safe bundle
(model.safetensors + model.json) and fastai's export.pkl.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import fastai.callback.channelslast  # noqa: F401  (adds Learner.to_channelslast and to_contiguous)
import numpy as np
import torch
from fastai.callback.core import Callback, CancelValidException
from fastai.callback.training import BnFreeze, bn_types
from fastai.torch_core import set_seed

from fastlesson import report
from fastlesson._io import save_png
from fastlesson.data import load_data
from fastlesson.export import export_bundle, export_learner, write_json
from fastlesson.finder import find_lr
from fastlesson.models import create_learner
from fastlesson.optim import OPTIMIZERS, opt_func
from fastlesson.precompute import precompute_head, precompute_learner
from fastlesson.schedule import (
    fit_one_cycle,
    fit_sgdr,
    freeze,
    freeze_to,
    lr_groups,
    n_groups,
    sgdr_cycle_lengths,
)

N_STEPS = 8
TTA_N = 4  # augmented passes averaged by fastai's tta (its default), plus one plain pass
SMOKE = {"size": 32, "bs": 8, "epochs_max": 1, "precompute_epochs": 1, "head_cycles": 1,
         "lr_find_iters": 32, "top_losses": 4}  # seconds-long run that still makes every output
FULL_LR_FLOOR = 10  # step 7's LR is kept within [head LR / 10, head LR]
RISE_TOL = 0.25  # step 7: the loss "starts to rise" where its smoothed curve goes, and stays, 25% above its minimum
MIN_LR_FIND_ITERS = 24  # find_lr needs 16 points after dropping the first 10% and the last 5


@dataclass
class RecipeConfig:
    """Everything a recipe run depends on; written to config.json as the effective configuration."""

    data: str = "sample"  # "sample" (shipped, offline) | "flowers" | "cifar10" | "cifar100" | a folder
    arch: str = "tf_efficientnet_lite0"  # torchvision or timm name; lite0 has offline ImageNet weights
    size: int = 160  # px, side of the square training input
    bs: int = 32  # images per batch
    opt: str = "adam"  # adam | sgd | radam | lookahead-radam | ranger (fastlesson.optim.opt_func)
    epochs_max: int = 7  # epochs, upper bound of step 8 (SGDR cycles of 1, 2, 4 epochs = 7)
    seed: int = 42  # seeds the split, the initial head and the batch order
    out: str | None = None  # output folder; None -> runs/<data>-<arch>-<YYYYmmdd-HHMMSS>
    precompute: bool = True  # step 3 on cached body activations (False: full forward passes)
    pretrained: bool = True  # ImageNet weights for the body (False: train from scratch)
    hard_mining: float | None = None  # fraction of each batch up-weighted x2 (HardExampleMining); None off
    smoke: bool = False  # tiny, seconds-long run with every step and output (for tests)
    # epochs of step 3. The lesson says 1-2, but on the cache an epoch costs a few percent of a real one;
    # on flowers102-small (lite0, 160 px, the step-2 LR) 2 epochs reach 73% and 8 reach 85% validation
    precompute_epochs: int = 8
    head_cycles: int = 2  # SGDR cycles of 1 epoch in step 4 (the lesson: 2-3)
    lr_factor: float = 10.0  # each earlier layer group trains this many times slower (the lesson: 3-10)
    # step 5 unfreezes layer groups from this one on (fastai's freeze_to): 0 = all layers; 1 keeps the
    # early body (stem and first stages) frozen. On flowers102-small (lite0, 160 px) three unfrozen epochs
    # from one start: 1 -> 86.3% at 110 s an epoch, 0 -> 84.0% at 160 s (its backward pass is the costly one)
    freeze_to: int = 1
    # keep the body's BatchNorm layers in eval mode with their ImageNet statistics and weights while the
    # body trains (fastai v0.7's bn_freeze(True)); trained BatchNorm follows the augmented batches of a
    # small data set away from the statistics the head learned on (flowers102-small: 82.3% -> 65.5% in the
    # first unfrozen epoch, 80.8% frozen). Applies to pretrained backbones only.
    bn_freeze: bool = True
    # step 8 validates at the end of each SGDR cycle only: the overfitting check and the best-weights
    # restore compare cycle ends, and a mid-cycle pass is a display that costs ~20% of a CPU epoch
    # (flowers102-small: 22 s of 110). True: every epoch, as fastai prints it
    valid_every_epoch: bool = False
    lr_find_iters: int = 100  # batches per LR range test
    tta: bool = True  # also report accuracy with fastai's test-time augmentation
    valid_pct: float = 0.2  # fraction held out when the data has no validation folder
    num_workers: int = 0  # DataLoader worker processes (0 = in-process, safest on small machines)
    top_losses: int = 9  # images in the top-losses plot

    def validate(self) -> RecipeConfig:
        """ValueError naming the first bad field and what to use instead."""
        checks = [
            ("size", self.size, isinstance(self.size, int) and self.size >= 16, "an integer >= 16 (px)"),
            ("bs", self.bs, isinstance(self.bs, int) and self.bs >= 1, "an integer >= 1"),
            ("epochs_max", self.epochs_max, isinstance(self.epochs_max, int) and self.epochs_max >= 1,
             "an integer >= 1 (epochs of step 8)"),
            ("precompute_epochs", self.precompute_epochs,
             isinstance(self.precompute_epochs, int) and self.precompute_epochs >= 1, "an integer >= 1"),
            ("head_cycles", self.head_cycles, isinstance(self.head_cycles, int) and self.head_cycles >= 1,
             "an integer >= 1"),
            ("freeze_to", self.freeze_to,
             isinstance(self.freeze_to, int) and not isinstance(self.freeze_to, bool) and self.freeze_to >= 0,
             "an integer >= 0 (0 unfreezes every layer group)"),
            ("lr_factor", self.lr_factor, isinstance(self.lr_factor, (int, float)) and self.lr_factor >= 1,
             "a number >= 1 (the lesson uses 3-10)"),
            ("lr_find_iters", self.lr_find_iters,
             isinstance(self.lr_find_iters, int) and self.lr_find_iters >= MIN_LR_FIND_ITERS,
             f"an integer >= {MIN_LR_FIND_ITERS}"),
            ("hard_mining", self.hard_mining, self.hard_mining is None or 0 < self.hard_mining <= 1,
             "a fraction in (0, 1], e.g. 0.25, or None"),
            ("opt", self.opt, str(self.opt).lower() in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
        ]
        for name, value, ok, fix in checks:
            if not ok:
                raise ValueError(f"RecipeConfig.{name}={value!r} is not valid: use {fix}")
        return self

    def effective(self) -> RecipeConfig:
        """The config actually run: smoke overrides applied and `out` resolved."""
        cfg = dataclasses.replace(self, **SMOKE) if self.smoke else dataclasses.replace(self)
        if not cfg.pretrained:  # random early layers must train, and there are no ImageNet statistics to keep
            cfg.freeze_to, cfg.bn_freeze = 0, False
        if cfg.out is None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(cfg.data)).name or str(cfg.data))
            cfg.out = str(Path("runs") / f"{name}-{cfg.arch.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}")
        return cfg.validate()


@dataclass
class RecipeResult:
    """What a run produced: numbers per step, final accuracy, the trained learner and its files."""

    out: Path
    config: RecipeConfig
    steps: list[dict]
    accuracy: float
    accuracy_tta: float | None
    valid_loss: float
    learn: object = field(repr=False)
    history: list[dict] = field(repr=False, default_factory=list)
    metrics: dict = field(repr=False, default_factory=dict)
    files: dict[str, Path] = field(repr=False, default_factory=dict)


class _RunLog(Callback):
    """Records, while `step` is set, every training batch's per-group LRs and every epoch's numbers."""

    order = 51  # after fastai's Recorder (50) has stored the epoch's values
    run_valid = False

    def __init__(self):
        self.step, self.lrs, self.rows, self.epoch_no = None, [], [], 0

    def before_epoch(self):
        self._t0 = time.perf_counter()

    def merge(self, other: _RunLog, n_groups: int) -> None:
        """Append `other`'s rows and LRs (a one-group head learner's LRs go to the last group)."""
        for r in other.rows:
            self.epoch_no += 1
            self.rows.append({**r, "epoch": self.epoch_no})
        pad = [math.nan] * (n_groups - 1)
        self.lrs += [pad + lrs[-1:] for lrs in other.lrs]

    def after_batch(self):
        if self.step is not None and self.training:
            self.lrs.append([float(h["lr"]) for h in self.opt.hypers])

    def after_epoch(self):
        if self.step is None or not self.recorder.values:
            return
        names = self.recorder.metric_names[1:]
        row = dict(zip(names, (float(v) if v is not None else None for v in self.recorder.values[-1])))
        self.epoch_no += 1
        self.rows.append({"step": self.step, "epoch": self.epoch_no, "step_epoch": self.epoch + 1,
                          "train_loss": row.get("train_loss"), "valid_loss": row.get("valid_loss"),
                          "accuracy": row.get("accuracy"), "lr": self.lrs[-1][-1] if self.lrs else None,
                          "seconds": round(time.perf_counter() - self._t0, 3)})


class ValidateAtFitEnd(Callback):
    """Skip validation on every epoch but a fit's last (fastai's CancelValidException; the epoch's row
    then has its training loss only). One SGDR cycle per fit: validation at the cycle ends only, where
    the LR has annealed; mid-cycle weights at a high LR are not kept anyway."""

    order = 61  # after fastai's ProgressCallback (60) has opened the validation bar that after_validate closes

    def before_validate(self):
        if self.epoch < self.n_epoch - 1:
            raise CancelValidException


class _BestWeights(Callback):
    """In-memory copy of the weights at the lowest validation loss seen (across several fits)."""

    order = 52

    def __init__(self, model, valid_loss: float):
        self.best, self.state, self.losses = valid_loss, _state_copy(model), []
        self.offset, self.best_epoch = 0, 0  # epochs before this fit; best epoch (1-based, 0 = start)

    def after_epoch(self):
        if getattr(self.recorder, "cancel_valid", False):
            return  # not validated (ValidateAtFitEnd): not a candidate
        loss = float(self.recorder.values[-1][1]) if self.recorder.values else math.nan
        self.losses.append(loss if math.isfinite(loss) else math.nan)
        if math.isfinite(loss) and loss < self.best:
            self.best, self.state = loss, _state_copy(self.model)
            self.best_epoch = self.offset + self.epoch + 1


def fit_until_overfit(learn, lr_max, epochs_max: int, cycle_len: int = 1, cycle_mult: int = 2, cbs=None,
                      baseline: float | None = None, valid_every_epoch: bool = True) -> dict:
    """SGDR cycles of cycle_len, cycle_len*cycle_mult, ... epochs while validation loss improves.

    The first cycle always runs; each later one runs only if the cycle before it lowered the best
    validation loss of this fit (when it did not, the model has started to overfit), and never past
    `epochs_max`. Then the best weights seen are loaded from an in-memory copy; the starting weights
    (validation loss `baseline`, measured when None) are a candidate too, so a fine-tune that never
    helps leaves the model as it was. `valid_every_epoch=False` validates only at the end of each cycle
    (the SGDR snapshots; then only those are candidates), saving a validation pass per mid-cycle epoch.
    Returns {cycles, epochs, best_valid_loss, best_epoch, reason}.
    """
    if isinstance(epochs_max, bool) or not isinstance(epochs_max, int) or epochs_max < 1:
        raise ValueError(f"epochs_max={epochs_max!r} must be an integer >= 1")
    if baseline is None:
        baseline = float(learn.validate()[0])
    best = _BestWeights(learn.model, baseline)
    epochs = cycles = 0
    prev = math.inf  # best validation loss of the earlier cycles of this fit
    while True:
        length = sgdr_cycle_lengths(cycles + 1, cycle_len, cycle_mult)[-1]
        if epochs + length > epochs_max:
            reason = f"the next cycle ({length} epochs) would pass epochs_max={epochs_max}"
            break
        print(f"  cycle {cycles + 1}: {length} epoch(s)", flush=True)
        best.offset, n_seen = epochs, len(best.losses)
        fit_sgdr(learn, n_cycles=1, cycle_len=length, cycle_mult=cycle_mult, lr_max=lr_max,
                 cbs=[best, *(cbs or []), *([] if valid_every_epoch else [ValidateAtFitEnd()])])
        epochs, cycles = epochs + length, cycles + 1
        cur = min(best.losses[n_seen:], default=math.nan)
        if not cur < prev:  # also stops on a non-finite loss
            reason = (f"validation loss did not improve in cycle {cycles} "
                      f"({cur:.4f} vs {prev:.4f}): it starts to overfit")
            break
        prev = cur
    learn.model.load_state_dict(best.state)
    return {"cycles": cycles, "epochs": epochs, "best_valid_loss": _num(best.best),
            "best_epoch": best.best_epoch, "reason": reason}


def _state_copy(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _Steps:
    """Prints step headers and one-line results; collects per-step metrics and LR segments."""

    def __init__(self, log: _RunLog):
        self.log, self.steps, self.segments = log, [], []

    def start(self, i: int, title: str, name: str, record: bool = True):
        """Print the header; `record=False` for LR range tests (their sweep is not training)."""
        print(f"\nStep {i}/{N_STEPS}: {title}", flush=True)
        self.cur = {"index": i, "name": name, "title": title}
        self.log.step = name if record else None
        self._n_rows, self._n_lrs = len(self.log.rows), len(self.log.lrs)
        self._t0 = time.perf_counter()

    def done(self, summary: str, lrs=None, **values) -> dict:
        """Close the step: numbers from the epochs it trained (unless given), print one line."""
        rows = self.log.rows[self._n_rows:]
        step = self.cur
        step.update({"seconds": round(time.perf_counter() - self._t0, 2), "epochs": len(rows)})
        if rows:
            step.update({k: rows[-1][k] for k in ("train_loss", "valid_loss", "accuracy")})
        step.update(values)
        seg = np.asarray(self.log.lrs[self._n_lrs:] if lrs is None else lrs, dtype=float)
        if seg.size:
            self.segments.append((step["name"], seg))
        self.log.step = None
        self.steps.append(step)
        print(f"  -> {summary} ({step['seconds']:.1f} s)", flush=True)
        return step


def _acc_text(step: dict) -> str:
    acc, vl = step.get("accuracy"), step.get("valid_loss")
    return "" if acc is None else f", valid loss {vl:.3f}, accuracy {100 * acc:.1f}%"


def rise_lr(res, tol: float = RISE_TOL) -> float:
    """LR where a range test's loss "starts to rise": from there on the smoothed loss stays above its
    minimum by more than `tol` (relative). The minimum is taken inside find_lr's window (its first 10%
    of points are noisy); a bump that comes back down is not the rise. The last LR tested if none."""
    sm, lrs = np.asarray(res.smoothed, dtype=float), np.asarray(res.lrs, dtype=float)
    lo = (getattr(res, "window", None) or (0, len(sm)))[0]
    i = lo + int(np.argmin(sm[lo:]))
    not_above = np.flatnonzero(sm[i:] <= sm[i] + tol * abs(sm[i]))  # holds at i itself
    j = i + int(not_above[-1]) + 1  # the first point of the final run above the threshold
    return float(lrs[j] if j < len(lrs) else lrs[-1])


def _lr_range_test(learn, cfg, png: Path, fallback: float, rise: bool = False, **kw) -> dict:
    """find_lr + its plot; if the test cannot suggest (tiny or wild data), `fallback`, said loudly.

    ``rise``: pick an order of magnitude below where the loss starts to rise (``rise_lr``), the lesson's
    rule for an unfrozen, already trained model, whose curve is flat until it rises: find_lr's valley
    then lands on noise (seen: 2.8e-5 on a curve flat from 1e-5 to 1e-2)."""
    try:
        res = find_lr(learn, num_it=cfg.lr_find_iters, **kw)
    except ValueError as e:
        print(f"  WARNING: the LR range test could not suggest an LR ({e}); using lr {fallback:.2e}")
        return {"suggestion": float(fallback), "stop_reason": "failed", "error": str(e),
                "summary": f"no suggestion, fallback lr {fallback:.2e}"}
    out = {"suggestion": float(res.suggestion), "stop_reason": res.stop_reason,
           "suggestions": {k: float(v) for k, v in res.suggestions.items()},
           "group_lrs": None if res.group_lrs is None else [float(v) for v in res.group_lrs],
           "plot": png.name,
           "summary": f"suggested lr {res.suggestion:.2e} ({res.stop_reason} after {len(res.lrs)} "
                      f"batches; fastai's valley {res.suggestions['valley']:.2e})"}
    fig = res.plot()
    if rise:
        at = rise_lr(res)
        out.update(find_lr_suggestion=out["suggestion"], rise_lr=at, suggestion=at / 10,
                   summary=f"loss starts to rise at lr {at:.2e}: using a tenth, {at / 10:.2e} "
                           f"({res.stop_reason} after {len(res.lrs)} batches; find_lr's valley-based "
                           f"suggestion {res.suggestion:.2e})")
        ax = fig.axes[0]
        ax.axvline(at, color="C3", ls=":", label=f"loss rises {at:.1e}")
        ax.axvline(at / 10, color="C4", ls="-.", label=f"rise / 10 = {at / 10:.1e}")
        ax.legend(loc="best", fontsize="small")
    save_png(fig, png)
    return out


def _precompute_step(learn, cfg, steps: _Steps, lr: float, head_learn) -> None:
    """Step 3: head on cached body activations (or, with precompute off, full forward passes)."""
    if not cfg.precompute:
        fit_one_cycle(learn, cfg.precompute_epochs, lr_max=lr)
        st = steps.done(f"{cfg.precompute_epochs} epoch(s) one-cycle at lr {lr:.2e}, no precompute",
                        lr=lr, note="precompute off: full forward passes with augmentation")
        print(f"     {_acc_text(st)[2:]}")
        return
    head_log = _RunLog()  # the head trains in its own Learner: log it there, then merge
    head_log.step = steps.log.step
    res = precompute_head(learn, cfg.precompute_epochs, lr_max=lr, head_learn=head_learn, cbs=[head_log])
    steps.log.merge(head_log, n_groups(learn))
    st = steps.done(f"{res.epochs} epoch(s) one-cycle at lr {lr:.2e} on the activations cached in step 2 "
                    f"(body pass {res.seconds_cache:.1f} s{', reused' if res.cache_hit else ''}), head "
                    f"trained in {res.seconds_train:.1f} s", lr=lr, seconds_cache=round(res.seconds_cache, 2),
                    seconds_train=round(res.seconds_train, 2), cache_hit=bool(res.cache_hit),
                    train_loss=_num(res.train_loss), valid_loss=_num(res.valid_loss),
                    accuracy=_num(res.accuracy),
                    note=f"body run once in {res.seconds_cache:.1f} s, head trained in {res.seconds_train:.1f} s")
    print(f"     {_acc_text(st)[2:]}")


@contextmanager
def _held(params):
    """Inside the block the trainable ones of `params` get no gradient; restored after, also on error."""
    held = [p for p in params if p.requires_grad]
    for p in held:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in held:
            p.requires_grad_(True)


def _body_bn_params(learn) -> list:
    """Parameters of the body's BatchNorm layers (``learn.model[0]``): those fastai's BnFreeze acts on."""
    return [p for m in learn.model[0].modules() if isinstance(m, bn_types)
            for p in m.parameters(recurse=False)]


def _fit_head_frozen_body(learn, n_cycles: int, lr: float, cbs) -> None:
    """Step 4: SGDR on the head alone, the frozen body exactly as precompute saw it.

    fastai's frozen training keeps the body's BatchNorm layers trainable and in train mode
    (``train_bn``): on augmented batches their statistics move away from the ones the head was
    trained on in step 3, which undid that training (flowers102-small: 81.7% -> 65.9% after one
    epoch). Here they stay in eval mode and untrained (fastai's ``BnFreeze``), as in fastai v0.7,
    and since no gradient enters the body an epoch costs about one forward pass of it.
    """
    opt = learn.opt
    with _held(p for pl in opt.param_lists[:opt.frozen_idx] for p in pl):
        fit_sgdr(learn, n_cycles=n_cycles, cycle_len=1, cycle_mult=1, lr_max=lr, cbs=[BnFreeze(), *cbs])


def _num(v):
    """Plain float (or None) from a tensor/number, for JSON."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _hard_mining_cbs(cfg) -> list:
    if cfg.hard_mining is None:
        return []
    from fastlesson.callbacks import HardExampleMining

    return [HardExampleMining(frac=cfg.hard_mining)]


def _device_text() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)} (mixed precision)"
    return f"CPU ({torch.get_num_threads()} threads)"


def run_recipe(cfg: RecipeConfig | None = None) -> RecipeResult:
    """Run the eight steps of the lesson-2 recipe and write every output into `cfg.out`."""
    cfg = (cfg or RecipeConfig()).effective()
    out = Path(cfg.out)
    set_seed(cfg.seed)
    t_run = time.perf_counter()
    log = _RunLog()
    steps = _Steps(log)
    mining = _hard_mining_cbs(cfg)
    lrf = {}
    print(f"fastlesson recipe: data={cfg.data} arch={cfg.arch} size={cfg.size}px bs={cfg.bs} "
          f"opt={cfg.opt} on {_device_text()}; outputs in {out}")

    # 1. data with augmentation, pretrained backbone
    steps.start(1, "data with augmentation and a pretrained backbone", "data")
    data = load_data(cfg.data, size=cfg.size, bs=cfg.bs, seed=cfg.seed, valid_pct=cfg.valid_pct,
                     num_workers=cfg.num_workers)
    dls = data.dls
    learn = create_learner(dls, arch=cfg.arch, pretrained=cfg.pretrained, opt_func=opt_func(cfg.opt))
    learn.add_cb(log)
    # channels-last tensors: mkldnn's convolutions on CPU run ~1.5x faster (lite0 at 160 px: a training
    # batch of 32 in 2.5 s instead of 3.7 s); on GPU with fastai's mixed precision, as in to_fp16
    learn.to_channelslast(use_amp=torch.cuda.is_available())
    learn.model.to(memory_format=torch.channels_last)  # now, for step 2's body pass (the callback: at fit)
    n_train, n_valid = len(dls.train_ds), len(dls.valid_ds)
    freeze(learn, verbose=False)
    if cfg.freeze_to > n_groups(learn) - 2:
        raise ValueError(f"RecipeConfig.freeze_to={cfg.freeze_to} would leave only the head to train in step 8: "
                         f"{cfg.arch} has {n_groups(learn)} layer groups, use 0..{n_groups(learn) - 2}")
    skipped = [(str(p), str(r)) for p, r in (getattr(data, "skipped", None) or [])]
    steps.done(f"{len(dls.vocab)} classes, {n_train} train / {n_valid} valid images"
               f"{f', {len(skipped)} unreadable skipped' if skipped else ''}; {cfg.arch} "
               f"({'ImageNet weights' if cfg.pretrained else 'from scratch'}), {n_groups(learn)} layer groups",
               n_classes=len(dls.vocab), n_train=n_train, n_valid=n_valid, n_skipped=len(skipped))
    # the output folder is made only once the data and model are known good: bad input leaves nothing
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dataclasses.asdict(cfg))

    # 2. LR range test on the frozen model (head only trains). With precompute, on the cached body
    # activations, as fastai v0.7's lr_find did with precompute=True: the body runs once, here, and
    # the sweep costs seconds instead of ~100 full forward/backward passes
    head_learn = None
    if cfg.precompute:
        steps.start(2, "LR range test on the head (body activations computed once and cached)",
                    "lr_find_head", record=False)
        # cache in memory only: on disk the activations can be hundreds of MB (flowers at 160 px: ~370 MB)
        head_learn = precompute_learner(learn, cache_dir=None, bs=cfg.bs)
        print(f"  body run once over {n_train + n_valid} images in {head_learn.precompute.seconds:.1f} s")
    else:
        steps.start(2, "LR range test with the body frozen", "lr_find_head", record=False)
    lrf["head"] = _lr_range_test(head_learn or learn, cfg, out / "lr_find_head.png", fallback=learn.lr)
    lr_head = lrf["head"]["suggestion"]
    steps.done(lrf["head"]["summary"], lrs=[], lr=lr_head)

    # 3. head on precomputed activations
    steps.start(3, "train the head on precomputed activations" if cfg.precompute
                else "train the head (precompute off: full forward passes)", "precompute")
    _precompute_step(learn, cfg, steps, lr_head, head_learn)

    # 4. head with augmentation, SGDR cycle_len=1
    steps.start(4, "train the head with augmentation (SGDR, cycle_len=1)", "head_sgdr")
    _fit_head_frozen_body(learn, cfg.head_cycles, lr_head, mining)
    st = steps.done(f"{cfg.head_cycles} cycle(s) of 1 epoch at lr {lr_head:.2e}, body BatchNorm frozen",
                    lr=lr_head)
    print(f"     {_acc_text(st)[2:]}")

    # 5. unfreeze (from group cfg.freeze_to on); with bn_freeze the body's BatchNorm stays as it was
    title = ("unfreeze all layers" if cfg.freeze_to == 0 else
             f"unfreeze layer groups {cfg.freeze_to} and up (the early body stays frozen)")
    steps.start(5, title, "unfreeze")
    n_train_groups = freeze_to(learn, cfg.freeze_to, verbose=False)  # 0: fastai's unfreeze
    bn_held = _body_bn_params(learn) if cfg.bn_freeze else []
    held_ids = {id(p) for p in bn_held}
    n_params = sum(p.numel() for p in learn.model.parameters() if p.requires_grad and id(p) not in held_ids)
    bn_note = "; body BatchNorm frozen (eval mode, ImageNet statistics)" if cfg.bn_freeze else ""
    steps.done(f"{n_train_groups} of {n_groups(learn)} layer groups trainable, {n_params / 1e6:.2f} M "
               f"parameters{bn_note}", lrs=[], trainable_groups=n_train_groups, bn_freeze=cfg.bn_freeze)
    bn_cbs = [BnFreeze()] if cfg.bn_freeze else []

    # 6. discriminative LRs
    steps.start(6, f"discriminative learning rates ({cfg.lr_factor:g}x lower per earlier group)",
                "discriminative")
    ratios = lr_groups(learn, 1.0, factor=cfg.lr_factor)
    frozen_note = f" (group{'s' if cfg.freeze_to > 1 else ''} below {cfg.freeze_to} frozen)" if cfg.freeze_to else ""
    steps.done("LR ratios by group (early body -> head): " + " : ".join(f"{r:.3g}" for r in ratios) + frozen_note,
               lrs=[], ratios=[float(r) for r in ratios])

    # 7. LR range test again, unfrozen, keeping the ratios
    steps.start(7, "LR range test again on the unfrozen model", "lr_find_full", record=False)
    with _held(bn_held):
        lrf["full"] = _lr_range_test(learn, cfg, out / "lr_find_full.png", fallback=lr_head / 10,
                                     rise=True, lr_ratios=ratios.tolist(), cbs=bn_cbs)
    # never above the head's LR: a higher LR on a trained head undoes the work of steps 3-4; never
    # below a tenth of it: a fine-tune at lower LRs barely moves
    suggested = lrf["full"]["suggestion"]
    lr_top = float(np.clip(suggested, lr_head / FULL_LR_FLOOR, lr_head))
    lrs_full = ratios * lr_top
    capped = lr_top < suggested
    floored = lr_top > suggested
    clamp = (" (capped at the head LR)" if capped else
             f" (raised to the head LR / {FULL_LR_FLOOR})" if floored else "")
    steps.done(lrf["full"]["summary"] + clamp + "; group LRs "
               + " / ".join(f"{v:.1e}" for v in lrs_full), lrs=[], lr=[float(v) for v in lrs_full],
               capped_at_head_lr=capped, floored_at_head_lr_div=floored,
               note=f"suggested {suggested:.1e}, using {lr_top:.1e}{clamp}" if clamp else "")

    # 8. full network, SGDR cycle_mult=2, until validation loss stops improving
    steps.start(8, "train the full network (SGDR, cycle_mult=2) until it overfits", "full_sgdr")
    base_loss = next((r["valid_loss"] for r in reversed(log.rows) if r.get("valid_loss") is not None),
                     None)
    with _held(bn_held):
        stop = fit_until_overfit(learn, lrs_full, cfg.epochs_max, cbs=[*bn_cbs, *mining], baseline=base_loss,
                                 valid_every_epoch=cfg.valid_every_epoch)
    bvl = stop["best_valid_loss"]
    steps.done(f"{stop['cycles']} cycle(s), {stop['epochs']} epochs; stopped: {stop['reason']}; best valid "
               f"loss {'n/a' if bvl is None else f'{bvl:.3f}'} (epoch {stop['best_epoch']}) restored", lr=[float(v) for v in lrs_full], **stop,
               note=f"{stop['cycles']} cycle(s); stopped: {stop['reason']}")
    learn.remove_cb(log)

    # final evaluation, plots, report, export
    print("\nEvaluating on the validation set", flush=True)
    final, plots = _evaluate_and_plot(learn, cfg, out, steps, log.rows, lrf)
    metrics = {"steps": steps.steps, "final": final, "lr_find": lrf,
               "seconds_total": round(time.perf_counter() - t_run, 1), "device": _device_text(),
               "skipped": skipped}
    files = _export(learn, cfg, out, final, metrics)
    write_json(out / "metrics.json", metrics)
    report.write_history_csv(log.rows, out / "history.csv")
    report.write_report(out, dataclasses.asdict(cfg), metrics, plots)
    files.update({k: out / v for k, v in plots.items()})
    files.update({k: out / f"{k}.{ext}" for k, ext in
                  (("config", "json"), ("metrics", "json"), ("history", "csv"), ("report", "md"))})
    tta_txt = "" if final["accuracy_tta"] is None else f", {100 * final['accuracy_tta']:.1f}% with TTA"
    print(f"\nDone in {metrics['seconds_total']:.0f} s: validation accuracy {100 * final['accuracy']:.1f}%"
          f"{tta_txt}. Report: {out / 'report.md'}")
    return RecipeResult(out=out, config=cfg, steps=steps.steps, accuracy=final["accuracy"],
                        accuracy_tta=final["accuracy_tta"], valid_loss=final["valid_loss"], learn=learn,
                        history=log.rows, metrics=metrics, files=files)


def _evaluate_and_plot(learn, cfg, out: Path, steps: _Steps, history, lrf) -> tuple[dict, dict]:
    """Final accuracy (with and without TTA) and every plot; returns (final metrics, {plot: file})."""
    preds, targs, losses = learn.get_preds(with_loss=True)
    pred_idx = preds.argmax(1)
    classes = [str(c) for c in learn.dls.vocab]
    final = {"accuracy": float((pred_idx == targs).float().mean()), "valid_loss": float(losses.mean()),
             "accuracy_tta": None, "n_valid": len(targs), "n_classes": len(classes)}
    if cfg.tta:
        tp, tt = learn.tta(n=2 if cfg.smoke else TTA_N)
        final["accuracy_tta"] = float((tp.argmax(1) == tt).float().mean())
    cm = report.confusion_matrix(targs.numpy(), pred_idx.numpy(), len(classes))
    final["most_confused"] = report.most_confused(cm, classes, k=10)
    plots = {k: v["plot"] for k, v in (("lr_find_head", lrf["head"]), ("lr_find_full", lrf["full"]))
             if "plot" in v}
    report.plot_lr_schedule(steps.segments, out / "lr_schedule.png")
    report.plot_losses(history, out / "losses.png")
    report.plot_confusion(cm, classes, out / "confusion.png")
    plots.update({"lr_schedule": "lr_schedule.png", "losses": "losses.png", "confusion": "confusion.png"})
    k = min(cfg.top_losses, len(losses))
    top = losses.topk(k).indices.tolist()
    images = [_thumb(learn.dls.valid_ds, i, cfg.size) for i in top]
    if all(im is not None for im in images):
        report.plot_top_losses(images, [classes[targs[i]] for i in top], [classes[pred_idx[i]] for i in top],
                               [float(preds[i].max()) for i in top], [float(losses[i]) for i in top],
                               out / "top_losses.png")
        plots["top_losses"] = "top_losses.png"
    return final, plots


def _thumb(ds, i: int, size: int):
    """The i-th validation image as an RGB array about `size` px wide (None if it is not a PIL image)."""
    x = ds[i][0]
    if not hasattr(x, "convert"):
        return None
    img = x.convert("RGB")
    img.thumbnail((size * 2, size * 2))
    return np.asarray(img)


def _export(learn, cfg, out: Path, final: dict, metrics: dict) -> dict:
    """Safe bundle always; fastai's export.pkl too (its failure is reported, not fatal)."""
    learn.to_contiguous(to_fp32=True)  # plain fp32 weights in the default layout, loadable anywhere
    files = {"model.json": export_bundle(learn, out, arch=cfg.arch,
                                         extra={"data": str(cfg.data), "accuracy": final["accuracy"]})}
    files["model.safetensors"] = out / "model.safetensors"
    try:
        files["export.pkl"] = export_learner(learn, out / "export.pkl")
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        metrics["export_pkl_error"] = f"{type(e).__name__}: {e}"
        print(f"WARNING: fastai export.pkl failed ({metrics['export_pkl_error']}); "
              "the safe bundle model.safetensors + model.json was written")
    print(f"Exported: {', '.join(sorted(files))} in {out}")
    return files
