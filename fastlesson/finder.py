"""Robust LR range test (Smith 2015) on fastai: exponential sweep, suggestions, exact state restore.

fastai's ``Learner.lr_find`` is close, but it keeps training through NaN losses (its divergence test
``nan > 4 * best`` is False), restores the model from a file in ``model_dir`` (fails when that is not
writable) and only in ``after_fit`` (a KeyboardInterrupt or error mid-sweep leaves the swept weights
behind), and fails with IndexError/ZeroDivisionError on an empty training set. ``find_lr`` reuses
fastai's training loop and its four suggestion functions, and fixes those points.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.schedule import minimum, slide, steep, valley
from matplotlib.figure import Figure

from fastlesson._io import save_png
from fastlesson._rng import RNGState
from fastlesson.callbacks import state_copy
from fastlesson.distributed import world_size

__all__ = ["LRFinderResult", "find_lr", "suggest_lrs", "suggest_window", "diverged", "MIN_POINTS",
           "rise_lr"]

MIN_POINTS = 16  # finite points needed to suggest: fastai's `slide` compares gradients 15 points apart
SKIP_END = 5  # points dropped at the end before suggesting, as fastai's lr_find does (the blow-up)
SMOOTH_BETA = 0.98  # EMA factor of the smoothed loss, fastai's AvgSmoothLoss default
DIVERGE_FACTOR = 4.0  # stop when smoothed loss > 4 x best smoothed loss (fastai's rule), and ...
DIVERGE_WINDOW = 5  # ... the median of the last 5 raw losses is above that too (one noisy batch is not)
DIVERGE_WARMUP = 10  # batches (or num_it/10 if more) before the check starts and `best` is tracked:
# the debiased EMA of the first few batches is the mean of a handful of noisy losses. On a well-fitted
# head (loss ~0.05) fastai's bare rule stopped after 3 batches at lr=1.45e-07 on one noisy batch.
SKIP_START = 0.1  # fraction of the recorded points dropped at the start before suggesting (fastai: 10%)
SUGGEST_WINDOW = (1 / 100, 1 / 3)  # suggestion is clamped to this fraction of the min-loss LR
FASTAI_METHODS = {"valley": valley, "slide": slide, "steep": steep, "minimum": minimum}
# Learner attributes the training loop overwrites; restored after the sweep.
_LOOP_ATTRS = ("epoch", "n_epoch", "iter", "n_iter", "train_iter", "pct_train", "training",
               "smooth_loss", "final_record", "dl", "xb", "yb", "pred", "loss", "loss_grad")


@dataclass
class LRFinderResult:
    """What an LR range test recorded and suggests; LRs are the top (last) layer group's."""

    lrs: np.ndarray  # top-group LR of each recorded batch
    losses: np.ndarray  # raw per-batch train loss, finite only
    smoothed: np.ndarray  # debiased EMA of `losses` (beta=0.98, like fastai's recorder)
    suggestions: dict[str, float]  # fastai's valley, slide, steep, minimum
    suggestion: float  # the one the recipe uses: valley clamped near the minimum (see suggest_lrs)
    stop_reason: str  # "completed" | "diverged" | "non_finite"
    group_lrs: np.ndarray | None = None  # per-group LRs at `suggestion` (None for one group)
    window: tuple[int, int] | None = None  # [start, end) of the points suggested from (None: all)

    def plot(self, path: str | os.PathLike | None = None, ax=None) -> Figure:
        """Loss vs LR (log x) with the suggestion and fastai's four marked; writes a PNG to `path`."""
        if ax is None:
            # no pyplot: works headless and leaks no global figures
            fig = Figure(figsize=(6, 4), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        ax.plot(self.lrs, self.losses, color="0.75", lw=0.8, label="loss (raw)")
        ax.plot(self.lrs, self.smoothed, color="C0", label="loss (smoothed)")
        lo, hi = self.window or (0, len(self.lrs))
        wl, ws = np.log10(self.lrs[lo:hi]), self.smoothed[lo:hi]
        for i, (name, lr) in enumerate(self.suggestions.items()):
            ax.plot(lr, np.interp(np.log10(lr), wl, ws), "o", color=f"C{i + 2}", label=f"{name} {lr:.1e}")
        ax.axvline(self.suggestion, color="C1", ls="--", label=f"suggestion {self.suggestion:.1e}")
        ax.set_xscale("log")
        # y range from the analysed smoothed curve: the raw blow-up at the end would flatten it
        bottom = min(ws.min(), self.losses[lo:hi].min())
        top = max(ws.max(), self.smoothed[0])
        pad = max(top - bottom, 1e-3 * abs(top), 1e-12)
        ax.set_ylim(bottom - 0.1 * pad, top + 0.25 * pad)
        ax.set_xlabel("learning rate (top group)")
        ax.set_ylabel("train loss")
        ax.set_title(f"LR range test ({self.stop_reason}, {len(self.lrs)} batches)")
        ax.legend(loc="best", fontsize="small")
        if path is not None:
            save_png(fig, path)  # never leaves a half-written PNG at `path`
        return fig


def _finite_prefix(lrs, losses) -> tuple[np.ndarray, np.ndarray]:
    """The points before the first non-finite loss or LR."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    bad = ~(np.isfinite(losses) & np.isfinite(lrs) & (lrs > 0))
    n = int(np.argmax(bad)) if bad.any() else len(losses)
    return lrs[:n], losses[:n]


def suggest_lrs(lrs, losses) -> tuple[dict[str, float], float]:
    """fastai's four suggestions and the robust one, from the finite prefix of a loss-vs-LR curve.

    The robust suggestion is fastai's ``valley`` clamped into ``[lr_min/100, lr_min/3]``, where
    ``lr_min`` is the LR of the lowest (smoothed) loss; if valley is not finite, ``lr_min/10``
    (fastai's ``minimum``); finally kept inside the LRs actually measured. Why: the argmin of the
    smoothed loss is the most stable feature of the curve, while valley/slide/steep can land orders
    of magnitude apart (valley halfway between start_lr and the minimum on a clean curve, or at the
    first points of a noisy flat start; steep on one noisy drop; slide anywhere on a flat curve).
    Anchoring both
    ends on ``lr_min`` keeps the pick below the LR where loss stops falling (training there is on the
    edge of divergence) and at most two decades under it (lower LRs barely train), and inside that
    window valley still chooses the point of steady descent. On typical fine-tuning curves valley
    already sits 10-100x below ``lr_min`` and is returned unchanged.
    """
    lrs, losses = _finite_prefix(lrs, losses)
    if len(losses) < MIN_POINTS:
        raise ValueError(f"only {len(losses)} finite loss points to suggest an LR from, need "
                         f"{MIN_POINTS}: lower start_lr or end_lr (the loss became non-finite early), "
                         f"raise num_it, or use more training data")
    t_lrs, t_losses = torch.tensor(lrs), torch.tensor(losses)
    # fastai's functions take tensors (steep calls .log(), minimum .argmin()) and return (lr, point)
    suggestions = {name: float(fn(t_lrs, t_losses, len(lrs))[0]) for name, fn in FASTAI_METHODS.items()}
    lr_min = float(lrs[int(np.argmin(losses))])
    lo, hi = lr_min * SUGGEST_WINDOW[0], lr_min * SUGGEST_WINDOW[1]
    v = suggestions["valley"]
    suggestion = float(np.clip(v, lo, hi)) if math.isfinite(v) and v > 0 else lr_min / 10
    # no data outside the sweep: a curve rising from its first point gets the first LR, not lower
    return suggestions, float(np.clip(suggestion, lrs[0], lrs[-1]))


def diverged(smooth: float, best: float, recent) -> bool:
    """The range test's stop rule: the smoothed loss is above DIVERGE_FACTOR x its best (fastai's
    rule) and so is the median of the `recent` raw losses: a rise that persists, not one noisy batch
    (which lifts the smoothed loss of a low, noisy curve past 4x on its own)."""
    limit = DIVERGE_FACTOR * best
    return smooth > limit and float(np.median(recent)) > limit


def suggest_window(n: int) -> tuple[int, int]:
    """[start, end) of the `n` recorded points to suggest from: without the first 10% of the points
    (the EMA's noisy start) and the last SKIP_END (the blow-up), as fastai; for a sweep cut short (NaN,
    divergence) the 10% is of the points it has, and when that leaves fewer than MIN_POINTS of
    `n >= MIN_POINTS`, the skips shrink (the start first) so that MIN_POINTS remain. Fewer than
    MIN_POINTS: all of them (suggest_lrs then says how many there are and what it needs)."""
    if n < MIN_POINTS:
        return 0, n
    start, end = int(n * SKIP_START), n - SKIP_END
    if end - start < MIN_POINTS:
        start = max(0, min(start, end - MIN_POINTS))
        end = max(end, start + MIN_POINTS)
    return start, end


def _smooth(losses, beta: float = SMOOTH_BETA) -> np.ndarray:
    """Debiased exponential moving average, the same as fastai's AvgSmoothLoss."""
    out, avg = np.empty(len(losses)), 0.0
    for i, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        out[i] = avg / (1 - beta ** (i + 1))
    return out


class _RangeTest(Callback):
    """Sets an exponentially growing LR per batch on all groups (ratios kept), records the raw loss,
    and cancels the fit at `num_it`, at the first non-finite loss, or on divergence."""

    order = 60  # like fastai's ParamScheduler/LRFinder: after Recorder, so our LR is the one used

    def __init__(self, start_lr, end_lr, num_it, ratios, stop_div):
        self.start_lr, self.end_lr, self.num_it, self.stop_div = start_lr, end_lr, num_it, stop_div
        self.ratios = np.asarray(ratios, dtype=float)
        self.lrs, self.losses, self.stop_reason = [], [], "completed"
        self.avg, self.best = 0.0, math.inf
        self.warmup = max(DIVERGE_WARMUP, num_it // 10)

    def lr_at(self, i: int) -> float:
        # batch 0 at start_lr, batch num_it-1 at end_lr exactly (fastai ends one step short)
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / (self.num_it - 1))

    def before_batch(self):
        if self.training:
            self.opt.set_hyper("lr", [float(r) for r in self.ratios * self.lr_at(len(self.losses))])

    def after_loss(self):
        # Checked before backward/step, so a non-finite or diverged batch never updates the weights.
        if not self.training or len(self.yb) == 0:
            return
        loss = float(self.learn.loss.detach().float().mean())
        if not math.isfinite(loss):  # fastai would keep training on NaN: `nan > 4*best` is False
            self.stop_reason = "non_finite"
            raise CancelFitException()
        self.lrs.append(float(self.opt.hypers[-1]["lr"]))
        self.losses.append(loss)
        n = len(self.losses)
        self.avg = SMOOTH_BETA * self.avg + (1 - SMOOTH_BETA) * loss
        smooth = self.avg / (1 - SMOOTH_BETA**n)
        if n >= self.warmup:
            self.best = min(self.best, smooth)
            if self.stop_div and diverged(smooth, self.best, self.losses[-DIVERGE_WINDOW:]):
                self.stop_reason = "diverged"
                raise CancelFitException()
        if n >= self.num_it:
            raise CancelFitException()

    def before_validate(self):
        raise CancelValidException()  # the range test only trains


def _group_ratios(learn, lr_ratios) -> np.ndarray:
    """Per-group LR divided by the top group's: from `lr_ratios` (float/slice/array, resolved by
    fastai's set_hyper, so a slice means what it means in `fit`) or the optimizer's current LRs."""
    opt = learn.opt
    n = len(opt.hypers)
    if lr_ratios is None:
        lrs = np.array([h["lr"] for h in opt.hypers], dtype=float)
        if not (np.isfinite(lrs).all() and (lrs > 0).all()):
            raise ValueError(f"the optimizer's current per-group LRs {lrs.tolist()} do not define "
                             f"LR ratios; pass lr_ratios=, e.g. a slice(lo, hi) or one LR per group")
        return lrs / lrs[-1]
    if isinstance(lr_ratios, slice) and lr_ratios.start and n == 1:
        raise ValueError(f"lr_ratios={lr_ratios} has a lower bound but the model has one layer "
                         f"group (fastai would drop {lr_ratios.start}); pass a float instead")
    arr = np.atleast_1d(np.asarray(lr_ratios, dtype=float)) if not isinstance(lr_ratios, slice) else None
    if arr is not None and len(arr) not in (1, n):
        raise ValueError(f"lr_ratios has {len(arr)} values but the model has {n} layer groups; "
                         f"pass one LR per group, a float, or a slice")
    if arr is not None and not (np.isfinite(arr).all() and (arr > 0).all()):
        raise ValueError(f"lr_ratios={lr_ratios!r} must be positive and finite")
    opt.set_hyper("lr", lr_ratios if arr is None else arr.tolist())  # restored with the opt state
    lrs = np.array([h["lr"] for h in opt.hypers], dtype=float)
    return lrs / lrs[-1]


class _LearnerSnapshot:
    """In-memory copy of everything the sweep changes: weights and buffers, optimizer state (or its
    absence), per-module train/eval mode, the recorder, the loop attributes, the data loaders' shuffle
    RNGs and the global RNGs (so a later fit runs exactly as if no range test had run)."""

    def __init__(self, learn):
        self.learn = learn
        # CPU copies: bitwise exact, and no second copy of a big model in GPU memory
        self.weights = state_copy(learn.model)
        self.had_opt = learn.opt is not None
        self.opt_state = copy.deepcopy(learn.opt.state_dict()) if self.had_opt else None
        self.modes = [(m, m.training) for m in learn.model.modules()]
        self.attrs = {k: learn.__dict__[k] for k in _LOOP_ATTRS if k in learn.__dict__}
        rec = getattr(learn, "recorder", None)
        self.recorder = None
        if rec is not None:
            # before_fit rebinds the lists, but its smoothing metrics are updated in place
            metrics = {k: dict(vars(v)) for k, v in vars(rec).items() if k in ("loss", "smooth_loss")}
            self.recorder = (rec, {k: v for k, v in vars(rec).items() if k != "learn"}, metrics)
        self.rng = RNGState(learn.dls)

    def restore(self):
        learn = self.learn
        learn.model.load_state_dict(self.weights)  # copies in place: param objects stay the same
        if self.had_opt:
            learn.opt.zero_grad()
            learn.opt.load_state_dict(copy.deepcopy(self.opt_state))
        else:
            if learn.opt is not None:
                learn.opt.zero_grad()
            learn.opt = None
        for m, mode in self.modes:
            m.training = mode
        for k in _LOOP_ATTRS:
            if k in self.attrs:
                setattr(learn, k, self.attrs[k])
            elif k in learn.__dict__:
                delattr(learn, k)
        if self.recorder is not None:
            rec, attrs, metrics = self.recorder
            for k in [k for k in vars(rec) if k not in attrs and k != "learn"]:
                delattr(rec, k)  # made by this fit (e.g. metric_names on a never-fitted learner)
            rec.__dict__.update(attrs)
            for k, state in metrics.items():
                vars(attrs[k]).clear()
                vars(attrs[k]).update(state)
        self.rng.restore()


def _check_args(learn, start_lr, end_lr, num_it) -> int:
    """Validate arguments at the boundary; returns the number of training batches per epoch."""
    for name, v in (("start_lr", start_lr), ("end_lr", end_lr)):
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v!r} must be a positive finite number (e.g. 1e-7 / 10)")
    if end_lr <= start_lr:
        raise ValueError(f"end_lr={end_lr} must be larger than start_lr={start_lr}")
    need = next(n for n in range(2, 10_000) if n - n // 10 - SKIP_END >= MIN_POINTS)
    if int(num_it) != num_it or num_it < need:
        raise ValueError(f"num_it={num_it!r} is too small: the suggestions need at least "
                         f"{MIN_POINTS} points after skipping the first 10% and last {SKIP_END}; "
                         f"use num_it >= {need} (default 100)")
    n_items = len(learn.dls.train.dataset) if hasattr(learn.dls.train, "dataset") else None
    n_batches = len(learn.dls.train)
    if n_batches == 0:
        raise ValueError(f"the training set gives no batches ({n_items} items, "
                         f"bs={getattr(learn.dls.train, 'bs', '?')}, "
                         f"drop_last={getattr(learn.dls.train, 'drop_last', '?')}): add training "
                         f"data, lower bs, or set drop_last=False")
    return n_batches


def find_lr(learn, start_lr: float = 1e-7, end_lr: float = 10, num_it: int = 100,
            stop_div: bool = True, lr_ratios=None, cbs=None) -> LRFinderResult:
    """Exponential LR range test on `learn` that leaves the learner exactly as it found it.

    Every layer group is swept together, keeping the ratios of `lr_ratios` (float, slice or one LR
    per group, as in fastai's `fit`) or else of the optimizer's current per-group LRs; `lrs` are the
    top group's. Stops after `num_it` batches, at the first non-finite loss, or (`stop_div`) when the
    smoothed loss and the median of the last 5 losses exceed 4x the best smoothed loss (checked from
    batch max(10, num_it/10) on). Suggestions use the finite points minus the first 10% and the last 5
    (as fastai; see `suggest_window` for a sweep cut short). Weights, buffers and optimizer state are restored from memory copies, also on
    an exception or KeyboardInterrupt. Extra fastai callbacks `cbs` run during the sweep.
    """
    n_batches = _check_args(learn, start_lr, end_lr, num_it)
    num_it = int(num_it)
    snap = _LearnerSnapshot(learn)
    try:
        if learn.opt is None:
            learn.create_opt()  # removed again by restore(): the learner had none
        ratios = _group_ratios(learn, lr_ratios)
        test = _RangeTest(start_lr, end_lr, num_it, ratios, stop_div)
        # enough epochs for num_it batches on a small data set; data-parallel, an epoch is each process's
        # shard, as few as one batch (drop_last per shard), and the test stops itself at num_it anyway
        # (the loss it reads is the mean over the processes: see distributed.py)
        n_epoch = num_it // n_batches + 1 if world_size() == 1 else num_it
        with ExitStack() as stack:
            stack.enter_context(learn.no_logging())
            if hasattr(learn, "no_bar"):
                stack.enter_context(learn.no_bar())
            learn.fit(n_epoch, cbs=[test, *(cbs or [])])
    finally:
        snap.restore()
    lrs, losses = np.array(test.lrs), np.array(test.losses)
    smoothed = _smooth(losses)
    window = suggest_window(len(losses))
    try:
        suggestions, suggestion = suggest_lrs(lrs[slice(*window)], smoothed[slice(*window)])
    except ValueError as e:
        raise ValueError(f"LR range test stopped ({test.stop_reason}) after {len(losses)} finite "
                         f"batches at lr={lrs[-1] if len(lrs) else start_lr:.3g}; {e}") from None
    group_lrs = ratios * suggestion if len(ratios) > 1 else None
    return LRFinderResult(lrs=lrs, losses=losses, smoothed=smoothed, suggestions=suggestions,
                          suggestion=suggestion, stop_reason=test.stop_reason,
                          group_lrs=group_lrs, window=window)


# ----------------------------------------------------------------------------- where the loss rises

RISE_TOL = 0.25  # the loss "starts to rise" where its smoothed curve goes, and stays, 25% above its minimum


def rise_lr(res, tol: float = RISE_TOL) -> float:
    """LR where a range test's loss "starts to rise": from there on the smoothed loss stays above its
    minimum by more than `tol` (relative). The minimum is taken inside find_lr's window (its first 10%
    of points are noisy); a bump that comes back down is not the rise. The last LR tested if none.
    The lesson's rule for an unfrozen, already trained model is a tenth of this LR."""
    sm, lrs = np.asarray(res.smoothed, dtype=float), np.asarray(res.lrs, dtype=float)
    lo = (getattr(res, "window", None) or (0, len(sm)))[0]
    i = lo + int(np.argmin(sm[lo:]))
    not_above = np.flatnonzero(sm[i:] <= sm[i] + tol * abs(sm[i]))  # holds at i itself
    j = i + int(not_above[-1]) + 1  # the first point of the final run above the threshold
    return float(lrs[j] if j < len(lrs) else lrs[-1])
