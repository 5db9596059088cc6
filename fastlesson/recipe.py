"""The fast.ai lesson-2 recipe, end to end: `run_recipe(RecipeConfig(...)) -> RecipeResult`.

The eight steps (DESIGN.md) are public functions of one `RecipeState` (`step_data` ... `step_full_sgdr`,
then `step_evaluate` and `step_report`), each printing a header and a one-line result and returning
that step's numbers; `run_recipe` is the loop over `STEPS`, and notebook 05 calls the same functions:
 1. data with augmentation and a pretrained backbone        5. unfreeze (all but the early body)
 2. LR range test (frozen body)                             6. discriminative LRs (10x per group)
 3. train the head on precomputed activations               7. LR range test again (unfrozen)
 4. train the head with augmentation (SGDR, cycle_len=1)    8. full network, SGDR cycle_mult=2, until
                                                               validation loss stops improving
After each step and each SGDR cycle of step 8 the run folder holds a checkpoint (fastlesson.checkpoint):
`resume_recipe(out)` continues an interrupted run exactly. `budget` (minutes) plans the epochs so the
whole run fits (fastlesson.budget).
Outputs go to `cfg.out`: config.json, metrics.json, history.csv, PNG plots, report.md, the safe bundle
(model.safetensors + model.json) and fastai's export.pkl.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import fastai.callback.channelslast  # noqa: F401  (adds Learner.to_channelslast and to_contiguous)
import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.training import BnFreeze, bn_types
from fastai.torch_core import set_seed

from fastlesson import budget as budgets
from fastlesson import checkpoint as ckpt
from fastlesson import distributed as ddp
from fastlesson import report
from fastlesson._io import save_png, write_json
from fastlesson.callbacks import BestWeights, ProgressiveResize, average_states, state_copy
from fastlesson.data import load_data
from fastlesson.env import device_text
from fastlesson.export import (
    export_bundle,
    export_learner,
    export_onnx,
    learner_tta,
    save_examples,
)
from fastlesson.finder import RISE_TOL, find_lr, rise_lr  # noqa: F401  (RISE_TOL, rise_lr: re-exported)
from fastlesson.models import create_learner
from fastlesson.optim import OPTIMIZERS, opt_func
from fastlesson.precompute import precompute_head, precompute_learner
from fastlesson.schedule import (  # noqa: F401  (ValidateAtFitEnd, fit_until_overfit: re-exported)
    OverfitProgress,
    ValidateAtFitEnd,
    _max_cycles,
    fit_one_cycle,
    fit_sgdr,
    fit_until_overfit,
    freeze,
    freeze_to,
    lr_groups,
    n_groups,
    sgdr_cycle_lengths,
)

__all__ = ["STEPS", "RecipeConfig", "RecipeResult", "RecipeState", "resume_recipe", "run_recipe", "start_recipe",
           "step_data", "step_lr_find_head", "step_precompute", "step_head_sgdr", "step_unfreeze",
           "step_discriminative", "step_lr_find_full", "step_full_sgdr", "step_evaluate", "step_report"]

N_STEPS = 8
TTA_PASSES = 2  # flip TTA: the validation image and its mirror (fastlesson.export.learner_tta)
SMOKE = {"size": 32, "bs": 8, "epochs_max": 1, "precompute_epochs": 1, "head_cycles": 1,
         "lr_find_iters": 32, "top_losses": 4}  # seconds-long run that still makes every output
FULL_LR_FLOOR = 10  # step 7's LR is kept within [head LR / 10, head LR]
MIN_LR_FIND_ITERS = 24  # find_lr needs 16 points after dropping the first 10% and the last 5
LOG_KINDS = ("csv", "tensorboard", "wandb")  # fastlesson.loggers.LOGGERS


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
    # label smoothing: on flowers102-small (lite0, 160 px, --budget 12, seeds 42 and 1) 0.1 gave 91.2% and
    # 91.3% against 89.6% and 90.6% with plain cross-entropy (+1.2 points; with flip TTA +0.9: +2.3, -0.6)
    label_smoothing: float = 0.1  # fastai's label-smoothing cross-entropy with this eps (0: plain cross-entropy)
    smoke: bool = False  # tiny, seconds-long run with every step and output (for tests)
    # epochs of step 3. The lesson says 1-2, but on the cache an epoch costs a few percent of a real one;
    # on flowers102-small (lite0, 160 px, the step-2 LR) 2 epochs reach 73% and 8 reach 85% validation
    precompute_epochs: int = 8  # epochs of step 3 (one-cycle on the cached activations)
    head_cycles: int = 2  # SGDR cycles of 1 epoch in step 4 (the lesson: 2-3)
    lr_factor: float = 10.0  # each earlier layer group trains this many times slower (the lesson: 3-10)
    # step 5 unfreezes layer groups from this one on (fastai's freeze_to): 0 = all layers; 1 keeps the
    # early body (stem and first stages) frozen. On flowers102-small (lite0, 160 px) three unfrozen epochs
    # from one start: 1 -> 86.3% at 110 s an epoch, 0 -> 84.0% at 160 s (its backward pass is the costly one)
    freeze_to: int = 1  # step 5 unfreezes layer groups from this one on (0 = every layer)
    # keep the body's BatchNorm layers in eval mode with their ImageNet statistics and weights while the
    # body trains (fastai v0.7's bn_freeze(True)); trained BatchNorm follows the augmented batches of a
    # small data set away from the statistics the head learned on (flowers102-small: 82.3% -> 65.5% in the
    # first unfrozen epoch, 80.8% frozen). Applies to pretrained backbones only.
    bn_freeze: bool = True  # body BatchNorm stays in eval mode with ImageNet statistics in steps 7-8
    # step 8 validates at the end of each SGDR cycle only: the overfitting check and the best-weights
    # restore compare cycle ends, and a mid-cycle pass is a display that costs ~20% of a CPU epoch
    # (flowers102-small: 22 s of 110). True: every epoch, as fastai prints it
    valid_every_epoch: bool = False  # step 8 validates every epoch (default: at SGDR cycle ends only)
    lr_find_iters: int = 100  # batches per LR range test
    tta: bool = True  # also report accuracy with fastai's test-time augmentation
    valid_pct: float = 0.2  # fraction held out when the data has no validation folder
    num_workers: int = 0  # DataLoader worker processes (0 = in-process, safest on small machines)
    top_losses: int = 9  # images in the top-losses plot
    budget: float | None = None  # minutes for the whole run, export included; None = no time limit
    # how a budget becomes step 8's SGDR cycles: doubling = 1, 2, 4, ... epochs (the lesson's cycle_mult=2,
    # re-planned after each cycle); long = 1 epoch (to measure the epoch time), then one cycle of all that fits
    budget_cycles: str = "doubling"  # with --budget, step 8's cycles: doubling | long (1 epoch, then one long cycle)
    # progressive resizing (fast.ai's DAWNBench recipe): every step-8 SGDR cycle but the last trains on
    # batches resized to this many px (faster epochs, so more of them fit a budget); the last cycle and
    # every validation are at `size`
    progressive: int | None = None  # px: step 8's cycles before the last train at this smaller size (None: off)
    # step 8 ends on the weights averaged over its last N SGDR cycle ends (stochastic weight averaging over
    # the snapshots where the LR has annealed) when their validation loss beats the best cycle end's; the
    # body's BatchNorm is frozen in step 8, so the average needs no BatchNorm re-estimation. On
    # flowers102-small (lite0, 160 px, --budget 12, bench/snapshots.py, 4 seeds) the last 2 gave +1.1 points
    average_cycles: int = 2  # step 8: average the weights of the last N cycle ends, if better (1: off)
    keep_checkpoints: bool = False  # keep RUN/checkpoint/ after the run completes (default: removed)
    log: str | None = None  # also log epochs with fastai's logger: csv | tensorboard | wandb

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
            ("label_smoothing", self.label_smoothing,
             isinstance(self.label_smoothing, (int, float)) and not isinstance(self.label_smoothing, bool)
             and 0 <= self.label_smoothing < 1, "a number in [0, 1), e.g. 0.1 (0: plain cross-entropy)"),
            ("opt", self.opt, str(self.opt).lower() in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("budget", self.budget, self.budget is None or (isinstance(self.budget, (int, float))
                                                           and not isinstance(self.budget, bool)
                                                           and math.isfinite(self.budget) and self.budget > 0),
             "a number of minutes > 0, e.g. 12, or None"),
            ("log", self.log, self.log is None or self.log in LOG_KINDS, f"one of {', '.join(LOG_KINDS)} or None"),
            ("budget_cycles", self.budget_cycles, self.budget_cycles in budgets.CYCLE_RULES,
             f"one of {', '.join(budgets.CYCLE_RULES)}"),
            ("progressive", self.progressive, self.progressive is None or (
                isinstance(self.progressive, int) and not isinstance(self.progressive, bool)
                and 16 <= self.progressive < self.size),
             f"a size in px from 16 to below size={self.size} (e.g. {max(16, self.size * 4 // 5)}), or None"),
            ("average_cycles", self.average_cycles, isinstance(self.average_cycles, int)
             and not isinstance(self.average_cycles, bool) and self.average_cycles >= 1,
             "an integer >= 1, e.g. 2 (1: no averaging, the best cycle end)"),
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


class _Clock(Callback):
    """Wall-clock of training passes, single training batches and validation passes (for the budget)."""

    order = 49  # before the Recorder: no effect on anything it records
    run_valid = True

    def __init__(self):
        self.batches, self.train_passes, self.valid_passes = [], [], []

    def before_train(self):
        self._t_train = time.perf_counter()

    def after_train(self):
        self.train_passes.append(time.perf_counter() - self._t_train)

    def before_batch(self):
        self._t_batch = time.perf_counter()

    def after_batch(self):
        if self.training:
            self.batches.append(time.perf_counter() - self._t_batch)

    def before_validate(self):
        self._t_valid, self._cancelled = time.perf_counter(), False

    def after_cancel_validate(self):
        self._cancelled = True

    def after_validate(self):
        if not getattr(self, "_cancelled", True):
            self.valid_passes.append(time.perf_counter() - self._t_valid)


def _median_batch(clock: _Clock) -> float:
    """Median training-batch time, the first batches (warm-up, allocation) left out when there are many."""
    b = clock.batches[3:] if len(clock.batches) > 8 else clock.batches
    return float(statistics.median(b)) if b else 0.0


class _Steps:
    """Prints step headers and one-line results; collects per-step metrics and LR segments."""

    def __init__(self, log: _RunLog):
        self.log, self.steps, self.segments, self.cur = log, [], [], None

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
        self.cur = None
        print(f"  -> {summary} ({step['seconds']:.1f} s)", flush=True)
        return step

    def numbers(self) -> dict:
        """Everything above as JSON-able numbers (for a checkpoint)."""
        cur = None if self.cur is None else {"step": self.cur, "n_rows": self._n_rows, "n_lrs": self._n_lrs,
                                             "seconds": time.perf_counter() - self._t0}
        return {"steps": self.steps, "segments": [[n, s.tolist()] for n, s in self.segments], "cur": cur}

    def restore(self, d: dict) -> None:
        self.steps = d["steps"]
        self.segments = [(n, np.asarray(s, dtype=float)) for n, s in d["segments"]]
        cur = d.get("cur")
        if cur is not None:  # resumed inside step 8: its header was printed by the first process
            self.cur, self._n_rows, self._n_lrs = cur["step"], cur["n_rows"], cur["n_lrs"]
            self._t0 = time.perf_counter() - cur["seconds"]
            self.log.step = self.cur["name"]


def _acc_text(step: dict) -> str:
    acc, vl = step.get("accuracy"), step.get("valid_loss")
    return "" if acc is None else f", valid loss {vl:.3f}, accuracy {100 * acc:.1f}%"


@dataclass
class RecipeState:
    """What the steps share: the learner, the effective config, the output folder, and what earlier
    steps chose (LRs, epochs, timings, the head learner on cached activations, the run log).
    Make one with `start_recipe(cfg)`; each `step_*` function reads and extends it."""

    cfg: RecipeConfig
    out: Path
    log: _RunLog = field(default_factory=_RunLog)
    clock: _Clock = field(default_factory=_Clock)
    steps: _Steps = None
    learn: object = field(default=None, repr=False)
    data: object = field(default=None, repr=False)
    head_learn: object = field(default=None, repr=False)  # step 2-3: the head on cached activations
    lr_head: float | None = None  # step 2's LR for the head (steps 3-4)
    ratios: list[float] | None = None  # step 6: per-group LR ratios, early body -> head
    lrs_full: list[float] | None = None  # step 7: the per-group LRs of step 8
    lrf: dict = field(default_factory=dict)  # the two LR range tests
    skipped: list = field(default_factory=list)  # unreadable images step 1 skipped, with reasons
    fingerprint: dict | None = None  # the data trained on (checked on resume)
    precompute_epochs: int = 0  # planned epochs of step 3 (cfg's, or the budget's)
    head_cycles: int = 0  # planned cycles of step 4
    full_cycles: list[int] | None = None  # step 8's cycle lengths from the budget (None: until epochs_max)
    budget: dict = field(default_factory=dict)  # the plans and their inputs
    times: dict = field(default_factory=dict)  # measured seconds the budget plans from
    done: list[str] = field(default_factory=list)  # names of the completed steps
    progress: OverfitProgress | None = None  # step 8 in progress: cycles done
    best: BestWeights | None = field(default=None, repr=False)  # step 8 in progress: best weights so far
    stop: dict | None = None  # step 8's result
    resize: ProgressiveResize | None = field(default=None, repr=False)  # step 8 with cfg.progressive
    small_before: int = 0  # step-8 epochs at the progressive size trained before a resume
    ends: list = field(default_factory=list, repr=False)  # step 8: the last cfg.average_cycles cycle-end weights
    resumed: list[dict] = field(default_factory=list)  # each resume: when, from where
    spent_before: float = 0.0  # seconds of earlier processes of this run (resume)
    t0: float = field(default_factory=time.perf_counter)
    checkpoints: bool = False  # write RUN/checkpoint/ after each step and cycle (run_recipe does)
    loggers: list = field(default_factory=list, repr=False)
    final: dict | None = None
    plots: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps is None:
            self.steps = _Steps(self.log)
        self.precompute_epochs = self.precompute_epochs or self.cfg.precompute_epochs
        self.head_cycles = self.head_cycles or self.cfg.head_cycles

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier processes (before a resume) included."""
        return self.spent_before + time.perf_counter() - self.t0

    @property
    def mining(self) -> list:
        return _hard_mining_cbs(self.cfg)

    @property
    def bn_held(self) -> list:
        """Body BatchNorm parameters held from training in steps 7-8 (bn_freeze)."""
        return _body_bn_params(self.learn) if self.cfg.bn_freeze else []

    @property
    def bn_cbs(self) -> list:
        return [BnFreeze()] if self.cfg.bn_freeze else []


def start_recipe(cfg: RecipeConfig | None = None) -> RecipeState:
    """The effective config, seeds set, the run's header printed: the state step 1 starts from."""
    n_proc = ddp.init_distributed()  # under torchrun / accelerate launch: data-parallel (distributed.py)
    cfg = (cfg or RecipeConfig()).effective()
    cfg.out = ddp.broadcast_object(cfg.out)  # one run folder: rank 0's (its timestamp)
    set_seed(cfg.seed)
    state = RecipeState(cfg=cfg, out=Path(cfg.out))
    dp = (f"; {n_proc} processes data-parallel, global batch {cfg.bs * n_proc} (LR not scaled: the range "
          f"tests run on the global batch)" if n_proc > 1 else "")
    if ddp.is_main_process():
        print(f"fastlesson recipe: data={cfg.data} arch={cfg.arch} size={cfg.size}px bs={cfg.bs} "
              f"opt={cfg.opt} on {device_text()}; outputs in {state.out}"
              f"{f'; budget {cfg.budget:g} min' if cfg.budget else ''}{dp}")
    return state


# ----------------------------------------------------------------------------- the eight steps

def step_data(state: RecipeState) -> dict:
    """Step 1: data with augmentation and a pretrained backbone; makes the output folder."""
    cfg, steps = state.cfg, state.steps
    steps.start(1, "data with augmentation and a pretrained backbone", "data")
    with ddp.main_process_first():  # a download (flowers, cifar) happens once, in rank 0
        data = load_data(cfg.data, size=cfg.size, bs=cfg.bs, seed=cfg.seed, valid_pct=cfg.valid_pct,
                         num_workers=cfg.num_workers)
    dls = data.dls
    learn = create_learner(dls, arch=cfg.arch, pretrained=cfg.pretrained, opt_func=opt_func(cfg.opt),
                           label_smoothing=cfg.label_smoothing)
    learn.add_cbs([state.log, state.clock])
    # data-parallel from here on: every fit, find_lr, body pass and get_preds; BatchNorm layers that train
    # (the head's; the body's too without bn_freeze) use the global batch's statistics (sync_bn), so N
    # processes train as one would on the global batch
    ddp.to_distributed(learn, sync_bn=True)
    ddp.seed_per_process(cfg.seed)  # each process its own augmentation draws (rank 0: cfg.seed's stream)
    # channels-last tensors: mkldnn's convolutions on CPU run ~1.5x faster (lite0 at 160 px: a training
    # batch of 32 in 2.5 s instead of 3.7 s); on GPU with fastai's mixed precision, as in to_fp16
    learn.to_channelslast(use_amp=torch.cuda.is_available())
    learn.model.to(memory_format=torch.channels_last)  # now, for step 2's body pass (the callback: at fit)
    n_train, n_valid = len(dls.train_ds), len(dls.valid_ds)
    freeze(learn, verbose=False)
    if cfg.freeze_to > n_groups(learn) - 2:
        raise ValueError(f"RecipeConfig.freeze_to={cfg.freeze_to} would leave only the head to train in step 8: "
                         f"{cfg.arch} has {n_groups(learn)} layer groups, use 0..{n_groups(learn) - 2}")
    state.data, state.learn = data, learn
    state.skipped = [(str(p), str(r)) for p, r in (getattr(data, "skipped", None) or [])]
    state.fingerprint = ckpt.data_fingerprint(dls)
    skipped = state.skipped
    st = steps.done(f"{len(dls.vocab)} classes, {n_train} train / {n_valid} valid images"
                    f"{f', {len(skipped)} unreadable skipped' if skipped else ''}; {cfg.arch} "
                    f"({'ImageNet weights' if cfg.pretrained else 'from scratch'}), {n_groups(learn)} layer groups",
                    n_classes=len(dls.vocab), n_train=n_train, n_valid=n_valid, n_skipped=len(skipped))
    # the output folder is made only once the data and model are known good: bad input leaves nothing
    if ddp.is_main_process():  # data-parallel: rank 0 writes the run folder, the others write nothing
        state.out.mkdir(parents=True, exist_ok=True)
        write_json(state.out / "config.json", dataclasses.asdict(cfg))
        _attach_loggers(state)
    return st


def _attach_loggers(state: RecipeState) -> None:
    if state.cfg.log is None:
        return
    from fastlesson.loggers import logger_callbacks  # optional extras: only when asked for

    state.loggers = logger_callbacks(state.cfg.log, state.out)
    state.learn.add_cbs(state.loggers)


def step_lr_find_head(state: RecipeState) -> dict:
    """Step 2: LR range test on the frozen model (head only trains). With precompute, on the cached body
    activations, as fastai v0.7's lr_find did with precompute=True: the body runs once, here, and the
    sweep costs seconds instead of ~100 full forward/backward passes."""
    cfg, steps, learn = state.cfg, state.steps, state.learn
    if cfg.precompute:
        steps.start(2, "LR range test on the head (body activations computed once and cached)",
                    "lr_find_head", record=False)
        # cache in memory only: on disk the activations can be hundreds of MB (flowers at 160 px: ~370 MB)
        with _forward_clock(learn.model[0]) as body_s:
            state.head_learn = precompute_learner(learn, cache_dir=None, bs=cfg.bs)
        state.times["body_pass"] = state.head_learn.cache.seconds
        if body_s[0] > 0:  # the model's share of that pass: its first decode of the images is not an epoch's
            state.times["body_forward"] = body_s[0]
        print(f"  body run once over {len(learn.dls.train_ds) + len(learn.dls.valid_ds)} images in "
              f"{state.head_learn.cache.seconds:.1f} s")
    else:
        steps.start(2, "LR range test with the body frozen", "lr_find_head", record=False)
    clock = _Clock()
    state.lrf["head"] = _lr_range_test(state.head_learn or learn, cfg, state.out / "lr_find_head.png",
                                       fallback=learn.lr, cbs=[clock])
    state.times["head_batch"] = _median_batch(clock)
    state.lr_head = state.lrf["head"]["suggestion"]
    st = steps.done(state.lrf["head"]["summary"], lrs=[], lr=state.lr_head)
    if cfg.budget is not None:
        _plan_head(state)
    return st


@contextmanager
def _forward_clock(module):
    """Inside the block: ``[seconds]`` spent in `module`'s forward calls (hooks; nothing else timed)."""
    total, started = [0.0], []
    pre = module.register_forward_pre_hook(lambda m, i: started.append(time.perf_counter()))
    post = module.register_forward_hook(
        lambda m, i, o: total.__setitem__(0, total[0] + time.perf_counter() - started.pop()))
    try:
        yield total
    finally:
        pre.remove()
        post.remove()


def step_precompute(state: RecipeState) -> dict:
    """Step 3: the head on cached body activations (or, with precompute off, full forward passes)."""
    cfg, steps, learn, lr = state.cfg, state.steps, state.learn, state.lr_head
    n = state.precompute_epochs
    if not cfg.precompute:
        steps.start(3, "train the head (precompute off: full forward passes)", "precompute")
        fit_one_cycle(learn, n, lr_max=lr)
        st = steps.done(f"{n} epoch(s) one-cycle at lr {lr:.2e}, no precompute",
                        lr=lr, note="precompute off: full forward passes with augmentation")
        print(f"     {_acc_text(st)[2:]}")
        return st
    steps.start(3, "train the head on precomputed activations", "precompute")
    head_log = _RunLog()  # the head trains in its own Learner: log it there, then merge
    head_log.step = steps.log.step
    res = precompute_head(learn, n, lr_max=lr, head_learn=state.head_learn, cbs=[head_log])
    steps.log.merge(head_log, n_groups(learn))
    st = steps.done(f"{res.epochs} epoch(s) one-cycle at lr {lr:.2e} on the activations cached in step 2 "
                    f"(body pass {res.seconds_cache:.1f} s{', reused' if res.cache_hit else ''}), head "
                    f"trained in {res.seconds_train:.1f} s", lr=lr, seconds_cache=round(res.seconds_cache, 2),
                    seconds_train=round(res.seconds_train, 2), cache_hit=bool(res.cache_hit),
                    train_loss=_num(res.train_loss), valid_loss=_num(res.valid_loss),
                    accuracy=_num(res.accuracy),
                    note=f"body run once in {res.seconds_cache:.1f} s, head trained in {res.seconds_train:.1f} s")
    print(f"     {_acc_text(st)[2:]}")
    state.head_learn = None  # the cached activations are not needed after this step: free them
    return st


def step_head_sgdr(state: RecipeState) -> dict:
    """Step 4: the head with augmentation, SGDR cycle_len=1, the body (and its BatchNorm) frozen."""
    steps, lr = state.steps, state.lr_head
    steps.start(4, "train the head with augmentation (SGDR, cycle_len=1)", "head_sgdr")
    n_train0, n_valid0 = len(state.clock.train_passes), len(state.clock.valid_passes)
    _fit_head_frozen_body(state.learn, state.head_cycles, lr, state.mining)
    st = steps.done(f"{state.head_cycles} cycle(s) of 1 epoch at lr {lr:.2e}, body BatchNorm frozen", lr=lr)
    print(f"     {_acc_text(st)[2:]}")
    state.times["head_epoch_train"] = float(np.mean(state.clock.train_passes[n_train0:]))
    state.times["valid"] = float(np.mean(state.clock.valid_passes[n_valid0:]))
    return st


def step_unfreeze(state: RecipeState) -> dict:
    """Step 5: unfreeze from group cfg.freeze_to on; with bn_freeze the body's BatchNorm stays as it was."""
    cfg, steps, learn = state.cfg, state.steps, state.learn
    title = ("unfreeze all layers" if cfg.freeze_to == 0 else
             f"unfreeze layer groups {cfg.freeze_to} and up (the early body stays frozen)")
    steps.start(5, title, "unfreeze")
    n_train_groups = freeze_to(learn, cfg.freeze_to, verbose=False)  # 0: fastai's unfreeze
    held_ids = {id(p) for p in state.bn_held}
    n_params = sum(p.numel() for p in learn.model.parameters() if p.requires_grad and id(p) not in held_ids)
    bn_note = "; body BatchNorm frozen (eval mode, ImageNet statistics)" if cfg.bn_freeze else ""
    return steps.done(f"{n_train_groups} of {n_groups(learn)} layer groups trainable, {n_params / 1e6:.2f} M "
                      f"parameters{bn_note}", lrs=[], trainable_groups=n_train_groups, bn_freeze=cfg.bn_freeze)


def step_discriminative(state: RecipeState) -> dict:
    """Step 6: discriminative LRs, each earlier layer group cfg.lr_factor times slower."""
    cfg, steps = state.cfg, state.steps
    steps.start(6, f"discriminative learning rates ({cfg.lr_factor:g}x lower per earlier group)",
                "discriminative")
    state.ratios = [float(r) for r in lr_groups(state.learn, 1.0, factor=cfg.lr_factor)]
    frozen_note = f" (group{'s' if cfg.freeze_to > 1 else ''} below {cfg.freeze_to} frozen)" if cfg.freeze_to else ""
    return steps.done("LR ratios by group (early body -> head): " + " : ".join(f"{r:.3g}" for r in state.ratios)
                      + frozen_note, lrs=[], ratios=list(state.ratios))


def step_lr_find_full(state: RecipeState) -> dict:
    """Step 7: LR range test again, unfrozen, keeping the ratios; a tenth of where the loss starts to rise,
    never above the head's LR (a higher LR on a trained head undoes steps 3-4) nor below a tenth of it
    (a fine-tune at lower LRs barely moves)."""
    cfg, steps, lr_head = state.cfg, state.steps, state.lr_head
    steps.start(7, "LR range test again on the unfrozen model", "lr_find_full", record=False)
    clock = _Clock()
    with _held(state.bn_held):
        state.lrf["full"] = _lr_range_test(state.learn, cfg, state.out / "lr_find_full.png",
                                           fallback=lr_head / 10, rise=True, lr_ratios=list(state.ratios),
                                           cbs=[*state.bn_cbs, clock])
    state.times["full_batch"] = _median_batch(clock)
    suggested = state.lrf["full"]["suggestion"]
    lr_top = float(np.clip(suggested, lr_head / FULL_LR_FLOOR, lr_head))
    state.lrs_full = [float(r * lr_top) for r in state.ratios]
    capped, floored = lr_top < suggested, lr_top > suggested
    clamp = (" (capped at the head LR)" if capped else
             f" (raised to the head LR / {FULL_LR_FLOOR})" if floored else "")
    return steps.done(state.lrf["full"]["summary"] + clamp + "; group LRs "
                      + " / ".join(f"{v:.1e}" for v in state.lrs_full), lrs=[], lr=list(state.lrs_full),
                      capped_at_head_lr=capped, floored_at_head_lr_div=floored,
                      note=f"suggested {suggested:.1e}, using {lr_top:.1e}{clamp}" if clamp else "")


def step_full_sgdr(state: RecipeState) -> dict:
    """Step 8: the full network, SGDR cycle_mult=2, until validation loss stops improving; the best
    weights (validated cycle ends, and the starting ones) are restored. Resumable after any cycle."""
    cfg, steps, learn = state.cfg, state.steps, state.learn
    if state.progress is None:  # a fresh start (not a resume inside this step)
        steps.start(8, "train the full network (SGDR, cycle_mult=2) until it overfits", "full_sgdr")
        base = next((r["valid_loss"] for r in reversed(state.log.rows) if r.get("valid_loss") is not None), None)
        state.best = BestWeights(learn.model, float(learn.validate()[0]) if base is None else base)
        state.progress = OverfitProgress()
    if cfg.budget is not None:
        _plan_full(state)
    # with a budget the plan bounds step 8 (and is re-planned after each cycle, see _after_full_cycle)
    epochs_max = budgets.MAX_FULL_EPOCHS if state.full_cycles else cfg.epochs_max
    n_passes = (len(state.clock.train_passes), len(state.clock.valid_passes))  # step 8's from here on
    state.resize = None if cfg.progressive is None else ProgressiveResize(
        cfg.progressive, active=lambda: state.progress.cycles < len(_planned_cycles(state)) - 1)
    state.small_before = int(state.times.get("progressive_epochs", 0))  # a resume inside step 8
    with _held(state.bn_held):
        stop = fit_until_overfit(learn, state.lrs_full, epochs_max,
                                 cbs=[*state.bn_cbs, *state.mining, *([state.resize] if state.resize else [])],
                                 valid_every_epoch=cfg.valid_every_epoch, best=state.best,
                                 progress=state.progress, cycle_lengths=state.full_cycles,
                                 after_cycle=lambda *_: _after_full_cycle(state, n_passes))
    state.stop, state.progress, state.best = stop, None, None
    bvl = stop["best_valid_loss"]
    small = _small_epochs(state)
    numbers = _restored_numbers(state.log.rows, stop["best_epoch"])
    avg = _average_cycle_ends(state, bvl)
    if avg.get("averaged_kept"):
        numbers.update(valid_loss=avg["averaged_valid_loss"], accuracy=avg["averaged_accuracy"])
        kept = (f"weights averaged over the last {avg['averaged_cycles']} cycle ends kept (valid loss "
                f"{avg['averaged_valid_loss']:.3f} vs the best cycle end's {bvl:.3f})")
        weights = f"weights averaged over the last {avg['averaged_cycles']} cycle ends"
    else:
        weights = f"restored best weights (epoch {stop['best_epoch']} of step 8)"
        kept = f"best valid loss {'n/a' if bvl is None else f'{bvl:.3f}'} (epoch {stop['best_epoch']}) restored"
        if avg:
            kept += f" (the last {avg['averaged_cycles']} cycle ends averaged: {avg['averaged_valid_loss']:.3f}, not better)"
    st = steps.done(f"{stop['cycles']} cycle(s), {stop['epochs']} epochs"
                    f"{f' ({small} at {cfg.progressive} px)' if cfg.progressive else ''}; stopped: "
                    f"{stop['reason']}; {kept}",
                    lr=list(state.lrs_full), **stop, **numbers, **avg,
                    **({"progressive_px": cfg.progressive, "progressive_epochs": small} if cfg.progressive else {}),
                    note=f"{stop['cycles']} cycle(s); stopped: {stop['reason']}; numbers of the {weights}")
    learn.remove_cbs([state.log, state.clock])
    return st


def _average_cycle_ends(state: RecipeState, best_loss: float | None) -> dict:
    """After step 8 has restored its best cycle end: the average of the last cfg.average_cycles cycle
    ends' weights (at least 2 trained) is validated and kept when its validation loss is lower. {} when
    there is nothing to average; else its numbers and whether it was kept."""
    cfg, learn = state.cfg, state.learn
    ends, state.ends = state.ends, []  # _after_full_cycle keeps only the last cfg.average_cycles
    if cfg.average_cycles < 2 or len(ends) < 2:
        return {}
    best = state_copy(learn.model)
    learn.model.load_state_dict(average_states(ends))
    res = learn.validate()
    loss, acc = float(res[0]), (float(res[1]) if len(res) > 1 else None)  # the recipe's metric: accuracy
    kept = ddp.broadcast_object(math.isfinite(loss) and (best_loss is None or loss < best_loss))  # rank 0's call
    if not kept:
        learn.model.load_state_dict(best)
    return {"averaged_cycles": len(ends), "averaged_valid_loss": loss, "averaged_accuracy": acc,
            "averaged_kept": kept}


def _planned_cycles(state: RecipeState) -> list[int]:
    """Step 8's cycle lengths as planned now: the budget's, or SGDR's 1, 2, 4, ... up to epochs_max."""
    if state.full_cycles:
        return state.full_cycles
    return sgdr_cycle_lengths(_max_cycles(state.cfg.epochs_max, 1, 2) - 1, 1, 2)  # the cycles fit_until_overfit runs


def _small_epochs(state: RecipeState) -> int:
    """Step-8 epochs trained at the progressive size, by this process and those before a resume."""
    return 0 if state.resize is None else state.small_before + sum(state.resize.small)


def _restored_numbers(rows: list[dict], best_epoch: int) -> dict:
    """Step 8's row shows the restored best weights: the numbers of step 8's epoch `best_epoch`
    (1-based; 0 = the weights step 8 started from, the last validated epoch before it), and the last
    epoch's for the record."""
    full = [r for r in rows if r["step"] == "full_sgdr"]
    if best_epoch >= 1:
        row = full[best_epoch - 1]
    else:
        row = next((r for r in reversed(rows) if r["step"] != "full_sgdr" and r.get("valid_loss") is not None),
                   {})
    last = full[-1] if full else {}
    return {"train_loss": row.get("train_loss"), "valid_loss": row.get("valid_loss"),
            "accuracy": row.get("accuracy"), "last_epoch_valid_loss": last.get("valid_loss"),
            "last_epoch_accuracy": last.get("accuracy")}


STEPS = [("data", step_data), ("lr_find_head", step_lr_find_head), ("precompute", step_precompute),
         ("head_sgdr", step_head_sgdr), ("unfreeze", step_unfreeze), ("discriminative", step_discriminative),
         ("lr_find_full", step_lr_find_full), ("full_sgdr", step_full_sgdr)]


# ----------------------------------------------------------------------------- the time budget

def _timings(state: RecipeState) -> budgets.Timings:
    learn, cfg = state.learn, state.cfg
    return budgets.estimate_timings(
        {**state.times, "spent": state.elapsed(), "lr_find_full_done": "lr_find_full" in state.done},
        n_train_batches=len(learn.dls.train), n_valid_batches=len(learn.dls.valid),
        n_train=len(learn.dls.train_ds), n_valid=len(learn.dls.valid_ds), precompute=cfg.precompute,
        lr_find_iters=cfg.lr_find_iters, tta_passes=TTA_PASSES if cfg.tta else 0,
        small_ratio=None if cfg.progressive is None else (cfg.progressive / cfg.size) ** 2,
        average_pass=cfg.average_cycles > 1)


def _plan_head(state: RecipeState) -> None:
    """After step 2, before any training: epochs of steps 3-4 and a first plan of step 8. ValueError
    naming the shortest budget when even the minimal recipe does not fit."""
    cfg = state.cfg
    t = _timings(state)
    plan = budgets.plan_budget(60 * cfg.budget, t, cfg.precompute_epochs, cfg.head_cycles,
                               valid_every_epoch=cfg.valid_every_epoch, rule=cfg.budget_cycles)
    plan = ddp.broadcast_object(plan)  # data-parallel: rank 0's plan (timings differ a little per process)
    state.precompute_epochs, state.head_cycles = plan.precompute_epochs, plan.head_cycles
    state.budget["first"] = {**plan.as_dict(), "timings": _rounded(dataclasses.asdict(t))}
    print(f"  budget {cfg.budget:g} min: step 3 {plan.precompute_epochs} epoch(s), step 4 {plan.head_cycles} "
          f"cycle(s), step 8 cycles {plan.full_cycles} (first estimate), about {plan.planned_s / 60:.1f} min")


def _plan_full(state: RecipeState) -> None:
    """At the start of step 8 (or its resume): whole SGDR cycles that fit what is left, printed."""
    if state.full_cycles is not None:  # planned before an interruption: keep that plan
        return
    cfg = state.cfg
    t = _timings(state)
    plan = budgets.plan_budget(60 * cfg.budget, t, state.precompute_epochs, state.head_cycles,
                               valid_every_epoch=cfg.valid_every_epoch, head_fixed=True, rule=cfg.budget_cycles)
    plan = ddp.broadcast_object(plan)  # data-parallel: every process trains rank 0's cycles
    state.full_cycles = plan.full_cycles
    state.budget["full"] = {**plan.as_dict(), "timings": _rounded(dataclasses.asdict(t))}
    print(f"  budget plan: {cfg.budget:g} min in all, {t.spent / 60:.1f} min spent; step 8: SGDR cycles of "
          f"{', '.join(map(str, plan.full_cycles))} epoch(s) at ~{t.full_epoch:.0f} s an epoch"
          f"{'' if t.full_epoch_small is None else f' (~{t.full_epoch_small:.0f} s at {cfg.progressive} px before the last cycle)'} "
          f"({plan.parts_s['full_sgdr'] / 60:.1f} min), evaluation and export ~{t.finish / 60:.1f} min; "
          f"planned end at {plan.planned_s / 60:.1f} min", flush=True)


def _after_full_cycle(state: RecipeState, n_passes: tuple[int, int]) -> list[int] | None:
    """After each SGDR cycle of step 8: with a budget, re-plan the cycles still to come from step 8's
    measured epoch times (then the checkpoint holds the new plan); the checkpoint. Returns the plan."""
    cfg, clock = state.cfg, state.clock
    if cfg.average_cycles > 1:  # this cycle end's weights, for the average at the end of step 8
        state.ends = [*state.ends, state_copy(state.learn.model)][-cfg.average_cycles:]
    if cfg.budget is not None and len(clock.train_passes) > n_passes[0]:
        passes = clock.train_passes[n_passes[0]:]
        small = state.resize.small[-len(passes):] if state.resize else [False] * len(passes)
        for key, want in (("full_epoch_train", False), ("full_epoch_train_small", True)):
            times = [t for t, s in zip(passes, small) if s == want]
            if times:
                state.times[key] = float(np.mean(times))
        if len(clock.valid_passes) > n_passes[1]:
            state.times["valid"] = float(np.mean(clock.valid_passes[n_passes[1]:]))
        done = state.full_cycles[:state.progress.cycles]
        plan = ddp.broadcast_object(budgets.replan_full(60 * cfg.budget, _timings(state), done,
                                                        valid_every_epoch=cfg.valid_every_epoch,
                                                        rule=cfg.budget_cycles))
        if plan.full_cycles != state.full_cycles and state.progress.reason is None:
            measured = " and ".join(f"~{state.times[k]:.0f} s{at}" for k, at in (
                ("full_epoch_train", f" at {cfg.size} px" if cfg.progressive else ""),
                ("full_epoch_train_small", f" at {cfg.progressive} px")) if k in state.times)
            print(f"  budget re-plan after cycle {len(done)} (step 8 epochs measured at {measured}): cycles "
                  f"{', '.join(map(str, plan.full_cycles))}; planned end at {plan.planned_s / 60:.1f} min", flush=True)
        state.full_cycles = plan.full_cycles
        state.budget.setdefault("replans", []).append(
            {"after_cycle": len(done), "full_cycles": plan.full_cycles, "planned_s": round(plan.planned_s, 1)})
    if state.resize is not None:
        state.times["progressive_epochs"] = _small_epochs(state)
    _checkpoint(state, "full_sgdr")
    return state.full_cycles


def _rounded(d: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


def _budget_summary(state: RecipeState, seconds_total: float) -> dict | None:
    """Planned vs actual, for metrics.json and the report."""
    if state.cfg.budget is None:
        return None
    full = state.budget.get("full", {})
    last = (state.budget.get("replans") or [full])[-1]  # the plan step 8 ended on
    stop = state.stop or {}
    return {"budget_min": state.cfg.budget,
            "planned": {"minutes": round(last.get("planned_s", math.nan) / 60, 2),
                        "precompute_epochs": state.precompute_epochs, "head_cycles": state.head_cycles,
                        "full_cycles": state.full_cycles},
            "actual": {"minutes": round(seconds_total / 60, 2), "full_cycles": stop.get("cycles"),
                       "full_epochs": stop.get("epochs")},
            "first_plan": state.budget.get("first"), "step8_plan": full,
            "replans": state.budget.get("replans", [])}  # after each step-8 cycle, on measured epoch times


# ----------------------------------------------------------------------------- helpers of the steps

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
    if ddp.is_main_process():
        save_png(fig, png)
    return out


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


# ----------------------------------------------------------------------------- evaluation and outputs

def step_evaluate(state: RecipeState) -> dict:
    """Final accuracy (with and without TTA) of the restored model, and every plot."""
    print("\nEvaluating on the validation set", flush=True)
    learn, cfg, out = state.learn, state.cfg, state.out
    preds, targs, losses = learn.get_preds(with_loss=True)
    pred_idx = preds.argmax(1)
    classes = [str(c) for c in learn.dls.vocab]
    final = {"accuracy": float((pred_idx == targs).float().mean()), "valid_loss": float(losses.mean()),
             "accuracy_tta": None, "n_valid": len(targs), "n_classes": len(classes)}
    if cfg.tta:  # flip TTA, the definition predict --tta and the app use (fastlesson.export.learner_tta)
        tp, tt = learner_tta(learn)
        final["accuracy_tta"] = float((tp.argmax(1) == tt).float().mean())
    interp = report.Interpretation(learn, learn.dls.valid, losses)  # fastai's, on the losses above
    final["most_confused"] = interp.most_confused()[:10]
    if not ddp.is_main_process():  # data-parallel: one set of plots, rank 0's
        state.final, state.plots = final, {}
        return final
    plots = {f"lr_find_{k}": state.lrf[k]["plot"] for k in ("head", "full") if "plot" in state.lrf.get(k, {})}
    report.plot_lr_schedule(state.steps.segments, out / "lr_schedule.png")
    report.plot_losses(state.log.rows, out / "losses.png")
    report.plot_confusion(interp, out / "confusion.png")
    plots.update({"lr_schedule": "lr_schedule.png", "losses": "losses.png", "confusion": "confusion.png"})
    k = min(cfg.top_losses, len(losses))
    top = interp.top_losses(k)[1].tolist()
    images = [_thumb(learn.dls.valid_ds, i, cfg.size) for i in top]
    if all(im is not None for im in images):
        report.plot_top_losses(images, [classes[targs[i]] for i in top], [classes[pred_idx[i]] for i in top],
                               [float(preds[i].max()) for i in top], [float(losses[i]) for i in top],
                               out / "top_losses.png")
        plots["top_losses"] = "top_losses.png"
    state.final, state.plots = final, plots
    return final


def _thumb(ds, i: int, size: int):
    """The i-th validation image as an RGB array about `size` px wide (None if it is not a PIL image)."""
    x = ds[i][0]
    if not hasattr(x, "convert"):
        return None
    img = x.convert("RGB")
    img.thumbnail((size * 2, size * 2))
    return np.asarray(img)


def step_report(state: RecipeState) -> RecipeResult:
    """Export (safe bundle + export.pkl), metrics.json, history.csv, report.md; checkpoints removed
    unless cfg.keep_checkpoints. Returns the run's RecipeResult."""
    cfg, out, final = state.cfg, state.out, state.final
    metrics = {"steps": state.steps.steps, "final": final, "lr_find": state.lrf, "device": device_text(),
               "skipped": state.skipped, "resumed": state.resumed,
               # world_size, global batch (bs x world_size) and the LR rule (not scaled, see distributed.py)
               "distributed": ddp.describe(cfg.bs)}
    ddp.detach_distributed(state.learn)  # the trained learner is a plain one again (and exportable)
    if not ddp.is_main_process():  # data-parallel: rank 0 writes the outputs, the others nothing
        return RecipeResult(out=out, config=cfg, steps=state.steps.steps, accuracy=final["accuracy"],
                            accuracy_tta=final["accuracy_tta"], valid_loss=final["valid_loss"],
                            learn=state.learn, history=state.log.rows, metrics=metrics)
    files = _export(state.learn, cfg, out, final, metrics)
    metrics["seconds_total"] = round(state.elapsed(), 1)
    metrics["budget"] = _budget_summary(state, metrics["seconds_total"])
    write_json(out / "metrics.json", metrics)
    report.write_history_csv(state.log.rows, out / "history.csv")
    report.write_report(out, dataclasses.asdict(cfg), metrics, state.plots)
    files.update({k: out / v for k, v in state.plots.items()})
    files.update({k: out / f"{k}.{ext}" for k, ext in
                  (("config", "json"), ("metrics", "json"), ("history", "csv"), ("report", "md"))})
    _close_loggers(state)
    if state.checkpoints:
        _finish_checkpoints(state)
    tta_txt = "" if final["accuracy_tta"] is None else f", {100 * final['accuracy_tta']:.1f}% with TTA"
    print(f"\nDone in {metrics['seconds_total']:.0f} s: validation accuracy {100 * final['accuracy']:.1f}%"
          f"{tta_txt}. Report: {out / 'report.md'}")
    return RecipeResult(out=out, config=cfg, steps=state.steps.steps, accuracy=final["accuracy"],
                        accuracy_tta=final["accuracy_tta"], valid_loss=final["valid_loss"], learn=state.learn,
                        history=state.log.rows, metrics=metrics, files=files)


def _close_loggers(state: RecipeState) -> None:
    if state.loggers:
        from fastlesson.loggers import close_loggers

        close_loggers(state.loggers)


def _export(learn, cfg, out: Path, final: dict, metrics: dict) -> dict:
    """Safe bundle always; fastai's export.pkl too (its failure is reported, not fatal)."""
    learn.to_contiguous(to_fp32=True)  # plain fp32 weights in the default layout, loadable anywhere
    files = {"model.json": export_bundle(learn, out, arch=cfg.arch,
                                         extra={"data": str(cfg.data), "accuracy": final["accuracy"]})}
    files["model.safetensors"] = out / "model.safetensors"
    # model.onnx checked against PyTorch on validation images; a model that cannot be exported is
    # reported (metrics, report) and the run still succeeds with the bundle
    metrics["onnx"] = export_onnx(learn, out)
    if metrics["onnx"].get("ok"):
        files["model.onnx"] = out / "model.onnx"
    else:
        print(f"WARNING: ONNX export failed ({metrics['onnx'].get('error')}); the safe bundle was written")
    metrics["examples"] = [p.name for p in save_examples(learn, out)]  # for the web demo (scripts/app.py)
    try:
        files["export.pkl"] = export_learner(learn, out / "export.pkl")
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        metrics["export_pkl_error"] = f"{type(e).__name__}: {e}"
        print(f"WARNING: fastai export.pkl failed ({metrics['export_pkl_error']}); "
              "the safe bundle model.safetensors + model.json was written")
    print(f"Exported: {', '.join(sorted(files))} in {out}")
    return files


# ----------------------------------------------------------------------------- run, checkpoint, resume

def run_recipe(cfg: RecipeConfig | None = None) -> RecipeResult:
    """Run the eight steps of the lesson-2 recipe and write every output into `cfg.out`; a checkpoint
    after each step and each SGDR cycle of step 8 lets `resume_recipe(cfg.out)` continue."""
    state = start_recipe(cfg)
    state.checkpoints = True
    return _run_steps(state)


def _run_steps(state: RecipeState) -> RecipeResult:
    with ddp.quiet_unless_main():  # data-parallel: one log on stdout, rank 0's
        for name, step in STEPS:
            if name in state.done:
                continue
            step(state)
            state.done.append(name)
            _checkpoint(state, name)
        step_evaluate(state)
        return step_report(state)


def _checkpoint(state: RecipeState, after: str) -> None:
    """Write RUN/checkpoint/ (no-op unless state.checkpoints; data-parallel, rank 0 writes it: the weights,
    optimizer state and RNGs are the same in every process)."""
    if not state.checkpoints or not ddp.is_main_process():
        return
    numbers = _state_numbers(state)
    numbers["after"] = after if state.progress is None else f"{after} cycle {state.progress.cycles}"
    ckpt.save_checkpoint(state.out, numbers, state.learn.model, state.learn.opt,
                         best_state=state.best.state if state.best is not None else None,
                         extra={f"end{i}": s for i, s in enumerate(state.ends)})


def _state_numbers(state: RecipeState) -> dict:
    """The state's numbers as JSON: enough, with the weights, optimizer and RNGs, to continue exactly."""
    best = state.best
    return {"config": dataclasses.asdict(state.cfg), "fingerprint": state.fingerprint, "done": list(state.done),
            "lr_head": state.lr_head, "ratios": state.ratios, "lrs_full": state.lrs_full, "lrf": state.lrf,
            "skipped": state.skipped, "precompute_epochs": state.precompute_epochs,
            "head_cycles": state.head_cycles, "full_cycles": state.full_cycles, "budget": state.budget,
            "times": state.times, "stop": state.stop, "resumed": state.resumed, "spent": state.elapsed(),
            "progress": None if state.progress is None else dataclasses.asdict(state.progress),
            "ends": len(state.ends),
            "best": None if best is None else {"best": best.best, "losses": best.losses, "offset": best.offset,
                                               "best_epoch": best.best_epoch},
            "log": {"rows": state.log.rows, "lrs": state.log.lrs, "epoch_no": state.log.epoch_no},
            "steps": state.steps.numbers(),
            "rng": ckpt.rng_state({"learn": state.learn.dls,
                                   "head": getattr(state.head_learn, "dls", None)})}


def _finish_checkpoints(state: RecipeState) -> None:
    if state.cfg.keep_checkpoints:
        _checkpoint(state, "finished")
        doc_path = ckpt.checkpoint_dir(state.out) / "state.json"
        print(f"Checkpoints kept in {doc_path.parent} (keep_checkpoints)")
    else:
        ckpt.remove_checkpoints(state.out)


def resume_recipe(run_dir) -> RecipeResult:
    """Continue the interrupted run in `run_dir` from its last completed step or SGDR cycle, with the
    config (config.json) and data it was started with: the same final weights and metrics as a run
    never interrupted (CPU, same seed). ValueError when the run is finished, has no checkpoint, or
    its config or data differ from the checkpoint's (the message names the difference)."""
    run_dir = Path(run_dir)
    cfg = _saved_config(run_dir)
    doc = ckpt.read_checkpoint(run_dir)
    if doc is None or doc.get("after") == "finished":
        if (run_dir / "metrics.json").is_file():
            raise ValueError(f"{run_dir} is a finished run (its metrics.json and report.md are written): "
                             f"nothing to resume; start a new run with another --out")
        raise ValueError(f"{run_dir} has no checkpoint ({ckpt.checkpoint_dir(run_dir)}/state.json): it stopped "
                         f"before step 1 ended; start it again with run_recipe / without --resume")
    diff = _difference(doc["config"], dataclasses.asdict(cfg))
    if diff:
        raise ValueError(f"cannot resume {run_dir}: config.json differs from the config the run started with "
                         f"({diff}); put config.json back, or start a new run with the new config")
    state = start_recipe(cfg)
    state.checkpoints = True
    print(f"Resuming {run_dir} after {doc['after']} (checkpoint written {doc['written']}); "
          f"rebuilding the data and the model first")
    step_data(state)
    diff = ckpt.fingerprint_difference(doc["fingerprint"], state.fingerprint)
    if diff:
        raise ValueError(f"cannot resume {run_dir}: the data in {cfg.data} differ from the data the run "
                         f"started with ({diff}); restore the data, or start a new run")
    _restore_state(state, doc)
    return _run_steps(state)


def _saved_config(run_dir: Path) -> RecipeConfig:
    import json

    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the --out folder of a recipe run to resume")
    saved = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"{path} has fields this fastlesson does not know: {unknown}; resume it with the "
                         f"fastlesson version that started it")
    return RecipeConfig(**saved)


def _difference(saved: dict, now: dict) -> str | None:
    keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return "; ".join(f"{k}: {saved.get(k)!r} when the run started, {now.get(k)!r} now" for k in keys) or None


def _restore_state(state: RecipeState, doc: dict) -> None:
    """Weights, optimizer, numbers, head learner and (last) every RNG, as the checkpoint has them."""
    learn, cfg, done = state.learn, state.cfg, doc["done"]
    if "unfreeze" in done:
        freeze_to(learn, cfg.freeze_to, verbose=False)  # fastai clears the optimizer state here: load after
    learn.model.load_state_dict(ckpt.load_tensors(state.out, doc, "model"))
    ckpt.load_optimizer(state.out, doc, learn.opt)
    for k in ("lr_head", "ratios", "lrs_full", "lrf", "skipped", "precompute_epochs", "head_cycles",
              "full_cycles", "budget", "times", "stop"):
        setattr(state, k, doc[k])
    state.done = list(done)
    state.skipped = [tuple(s) for s in state.skipped]
    if cfg.precompute and "lr_find_head" in done and "precompute" not in done:
        state.head_learn = precompute_learner(learn, cache_dir=None, bs=cfg.bs)  # the body pass again
    if doc["progress"] is not None:
        state.progress = OverfitProgress(**doc["progress"])
        state.best = BestWeights()
        state.best.state = ckpt.load_tensors(state.out, doc, "best")
        for k, v in doc["best"].items():
            setattr(state.best, k, v)
        state.ends = [ckpt.load_tensors(state.out, doc, f"end{i}") for i in range(doc.get("ends", 0))]
    state.log.rows, state.log.lrs, state.log.epoch_no = doc["log"]["rows"], doc["log"]["lrs"], doc["log"]["epoch_no"]
    state.steps.restore(doc["steps"])
    if "full_sgdr" in done:
        learn.remove_cbs([state.log, state.clock])
    state.spent_before = doc["spent"]
    state.resumed = doc["resumed"] + [{"at": time.strftime("%Y-%m-%d %H:%M:%S"), "after": doc["after"],
                                       "checkpoint_written": doc["written"], "spent_s": round(doc["spent"], 1)}]
    ckpt.restore_rng(doc["rng"], {"learn": learn.dls, "head": getattr(state.head_learn, "dls", None)})
