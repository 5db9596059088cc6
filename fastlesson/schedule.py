"""LR schedules on top of fastai: checked one-cycle, SGDR with exact restarts, discriminative LRs, freezing.

Conventions: LRs are per optimizer step (per batch); "epoch" is one pass over ``learn.dls.train``;
a learner's layer groups are its optimizer's param groups (fastai's ``splitter``), last group = head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelValidException
from fastai.callback.schedule import ParamScheduler, combined_cos
from fastai.optimizer import OptimWrapper
from fastcore.basics import even_mults
from fastcore.foundation import L

from fastlesson._io import atomic_write, save_png
from fastlesson.callbacks import BestWeights

__all__ = [
    "SCHEDULE_KINDS", "SGDRScheduler", "OverfitProgress", "ValidateAtFitEnd", "fit_one_cycle", "fit_sgdr",
    "fit_until_overfit", "freeze", "freeze_to", "lr_groups", "n_groups",
    "plot_schedules", "resolve_lrs", "schedule_preview", "sgdr_cycle_lengths", "sgdr_epochs", "sgdr_lrs",
    "unfreeze",
]


# ----------------------------------------------------------------------------- layer groups

def n_groups(learn) -> int:
    """Number of layer groups (optimizer param groups); creates the optimizer if needed, like fastai's freeze."""
    if learn.opt is None:
        learn.create_opt()
    return len(learn.opt.param_lists)


def _check_positive(name: str, value) -> float:
    """`value` as a float, or ValueError naming `name` when it is not a finite number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a positive number") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return v


def resolve_lrs(learn, lr_max) -> np.ndarray:
    """One LR per layer group from a float, a slice (fastai's semantics) or a per-group sequence.

    ``None`` -> ``learn.lr`` for every group (fastai's default); ``slice(hi)`` -> ``hi/10`` for the earlier
    groups and ``hi`` for the last; ``slice(lo, hi)`` -> geometric spacing from ``lo`` to ``hi``.
    Unlike fastai, ``slice(lo, hi)`` on a one-group model raises instead of silently using ``hi`` only.
    """
    n = n_groups(learn)
    if lr_max is None:
        lr_max = learn.lr
    if isinstance(lr_max, slice):
        if lr_max.step is not None:
            raise ValueError(f"lr_max={lr_max!r}: a slice step has no meaning; use slice(lo, hi) or slice(hi)")
        hi = _check_positive("lr_max (slice stop)", lr_max.stop)
        if lr_max.start is None:
            lrs = [hi / 10] * (n - 1) + [hi]
        else:
            lo = _check_positive("lr_max (slice start)", lr_max.start)
            if n == 1:
                raise ValueError(
                    f"lr_max={lr_max!r} asks for discriminative LRs, but the model has only 1 layer group, so "
                    f"fastai would silently train at {hi} and drop {lo}. Give the Learner a splitter "
                    f"(Learner(..., splitter=...)) or pass a single LR (lr_max={hi}).")
            lrs = even_mults(lo, hi, n)
            lrs[0], lrs[-1] = lo, hi  # exact ends (fastai's powers give e.g. 0.010000000000000002)
        return np.asarray(lrs, dtype=float)
    arr = np.atleast_1d(np.asarray(lr_max, dtype=float))
    if arr.ndim != 1 or len(arr) not in (1, n):
        raise ValueError(f"lr_max={lr_max!r} has {arr.size} values but the model has {n} layer groups; "
                         f"pass one LR, a slice, or exactly {n} LRs")
    for v in arr:
        _check_positive("lr_max", v)
    return np.broadcast_to(arr, (n,)).copy()


def lr_groups(learn, lr_max: float, factor: float = 3.0) -> np.ndarray:
    """Discriminative LRs: last (head) group at ``lr_max``, each earlier group ``factor`` times lower."""
    lr_max = _check_positive("lr_max", lr_max)
    if _check_positive("factor", factor) < 1:
        raise ValueError(f"factor={factor!r} must be >= 1 (earlier groups train slower; the recipe uses 3-10)")
    n = n_groups(learn)
    return lr_max / float(factor) ** np.arange(n - 1, -1, -1)


def _freeze_to(learn, n: int, verb: str, verbose: bool) -> int:
    """fastai's freeze_to (keeps BatchNorm trainable when train_bn), refusing one-group models."""
    total = n_groups(learn)
    if total < 2:
        raise ValueError(
            f"cannot {verb}: the model has {total} layer group, so fastai's {verb} would silently leave "
            f"everything trainable. Give the Learner a splitter (Learner(..., splitter=...)) that returns "
            f"at least two groups (body, head).")
    learn.freeze_to(n)
    trainable = total - learn.opt.frozen_idx
    if verbose:
        print(f"{verb}: {trainable} of {total} layer groups trainable")
    return trainable


def freeze(learn, verbose: bool = True) -> int:
    """Train only the last (head) group; returns the number of trainable groups (1)."""
    return _freeze_to(learn, -1, "freeze", verbose)


def unfreeze(learn, verbose: bool = True) -> int:
    """Train all groups; returns the number of trainable groups."""
    return _freeze_to(learn, 0, "unfreeze", verbose)


def freeze_to(learn, n: int, verbose: bool = True) -> int:
    """Freeze the layer groups before group ``n`` and train the rest (fastai's ``freeze_to``, which keeps
    BatchNorm trainable when ``train_bn``); returns the number of trainable groups."""
    total = n_groups(learn)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not -total <= n < total:
        raise ValueError(f"freeze_to n={n!r}: use a layer group index in [{-total}, {total - 1}] "
                         f"(0 trains every group, -1 only the head)")
    return _freeze_to(learn, int(n), "freeze_to", verbose)


# ----------------------------------------------------------------------------- one-cycle

def _opt_name(learn) -> str:
    """A readable name for the learner's optimizer (the wrapped torch class for an OptimWrapper)."""
    if isinstance(learn.opt, OptimWrapper):
        return f"{type(learn.opt.opt).__name__} (in fastai's OptimWrapper)"
    func = getattr(learn.opt_func, "func", learn.opt_func)  # unwrap functools.partial
    return getattr(func, "__name__", type(learn.opt).__name__)


def _check_hypers(learn, needed: tuple[str, ...], fix: str) -> None:
    """ValueError when the optimizer lacks a hyperparameter a schedule will set (fastai: KeyError mid-fit)."""
    if learn.opt is None:
        learn.create_opt()
    have = set(learn.opt.hypers[0])
    missing = [k for k in needed if k not in have]
    if missing:
        raise ValueError(
            f"optimizer {_opt_name(learn)} has no hyperparameter {missing} (it has {sorted(have)}), which "
            f"this schedule drives; {fix}")


def fit_one_cycle(learn, n_epoch: int, lr_max=None, moms=(0.95, 0.85, 0.95), div: float = 25.0,
                  div_final: float = 1e5, pct_start: float = 0.25, wd=None, cbs=None, reset_opt: bool = False,
                  start_epoch: int = 0) -> None:
    """fastai's fit_one_cycle after checking the optimizer has 'lr' (and 'mom' unless ``moms`` is None/False).

    ``moms=None`` or ``False`` schedules only the LR (for optimizers without momentum, e.g. Adagrad);
    note fastai's own ``moms=None`` means "use learn.moms" instead.
    """
    needed = ("lr", "mom") if moms else ("lr",)
    _check_hypers(learn, needed, "pass moms=None to schedule only the learning rate")
    lrs = resolve_lrs(learn, lr_max).tolist()
    if moms:
        learn.fit_one_cycle(n_epoch, lr_max=lrs, div=div, div_final=div_final, pct_start=pct_start, wd=wd,
                            moms=moms, cbs=cbs, reset_opt=reset_opt, start_epoch=start_epoch)
        return
    lr = np.asarray(lrs)
    scheds = {"lr": combined_cos(pct_start, lr / div, lr, lr / div_final)}
    cbs = L(ParamScheduler(scheds)) + L(cbs)
    learn.fit(n_epoch, lr=lrs, cbs=cbs, reset_opt=reset_opt, wd=wd, start_epoch=start_epoch)


# ----------------------------------------------------------------------------- SGDR

def _check_sgdr(n_cycles, cycle_len, cycle_mult) -> None:
    """ValueError naming the first bad SGDR argument."""
    if isinstance(n_cycles, bool) or not isinstance(n_cycles, (int, np.integer)) or n_cycles < 1:
        raise ValueError(f"n_cycles={n_cycles!r} must be an integer >= 1")
    _check_positive("cycle_len", cycle_len)
    if _check_positive("cycle_mult", cycle_mult) < 1:
        raise ValueError(f"cycle_mult={cycle_mult!r} must be >= 1 (1 = equal cycles, 2 = each twice as long)")


def sgdr_cycle_lengths(n_cycles: int, cycle_len: float, cycle_mult: float = 2) -> list[int]:
    """Epochs per cycle: ``cycle_len * cycle_mult**i``, each rounded half-up to a whole epoch (at least 1).

    Whole epochs keep every restart (and snapshot) on an epoch boundary, where fastai validates.
    E.g. (4, 1, 1.5) -> [1, 2, 2, 3] from 1, 1.5, 2.25, 3.375.
    """
    _check_sgdr(n_cycles, cycle_len, cycle_mult)
    return [max(1, math.floor(cycle_len * cycle_mult**i + 0.5)) for i in range(n_cycles)]


def sgdr_epochs(n_cycles: int, cycle_len: float, cycle_mult: float = 2) -> int:
    """Total epochs of an SGDR run (works for cycle_mult=1, where fastai divides by zero)."""
    return sum(sgdr_cycle_lengths(n_cycles, cycle_len, cycle_mult))


def _check_warmup(warmup, first_cycle_batches: int) -> int:
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be an integer number of batches >= 0")
    if warmup >= first_cycle_batches:
        raise ValueError(f"warmup={warmup} batches must be shorter than the first cycle "
                         f"({first_cycle_batches} batches); lower warmup or raise cycle_len")
    return int(warmup)


def _sgdr_table(cycle_batches: list[int], lr_max: np.ndarray, lr_min: np.ndarray, warmup: int) -> np.ndarray:
    """Per-batch LRs, shape (batches, groups): cosine from lr_max to lr_min in each cycle, restarting."""
    rows = []
    for i, n_b in enumerate(cycle_batches):
        w = warmup if i == 0 else 0
        if w:  # linear ramp lr_max/(w+1) ... lr_max*w/(w+1); the cosine then starts at exactly lr_max
            rows.append(lr_max * (np.arange(1, w + 1) / (w + 1))[:, None])
        frac = (1 - np.cos(np.pi * np.arange(n_b - w) / (n_b - w))) / 2  # exactly 0 at each restart
        rows.append(lr_max - (lr_max - lr_min) * frac[:, None])
    return np.concatenate(rows)


def sgdr_lrs(n_cycles: int, cycle_len: float, n_batches: int, lr_max: float = 1.0, cycle_mult: float = 2,
             lr_min: float = 0.0, warmup: int = 0) -> np.ndarray:
    """Per-batch LR preview of ``fit_sgdr`` for the last (head) group, with ``n_batches`` per epoch."""
    lr_max = _check_positive("lr_max", lr_max)
    if not 0 <= lr_min <= lr_max:
        raise ValueError(f"lr_min={lr_min!r} must be in [0, lr_max={lr_max}]")
    if isinstance(n_batches, bool) or not isinstance(n_batches, (int, np.integer)) or n_batches < 1:
        raise ValueError(f"n_batches={n_batches!r} must be an integer >= 1 (batches per epoch)")
    cycle_batches = [e * n_batches for e in sgdr_cycle_lengths(n_cycles, cycle_len, cycle_mult)]
    warmup = _check_warmup(warmup, cycle_batches[0])
    return _sgdr_table(cycle_batches, np.array([lr_max]), np.array([lr_min]), warmup)[:, 0]


def _save_state_dict(model: torch.nn.Module, path: Path) -> None:
    """torch.save the model's state_dict (CPU tensors) atomically: temp file in the same folder + os.replace."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: torch.save(state, p))


class SGDRScheduler(Callback):
    """Sets the LR of every group before each training batch from an SGDR table counted in whole batches.

    Same order as fastai's ParamScheduler (60), so callbacks with a higher order can rescale the LR after it
    in the same ``before_batch``. Momentum is not touched. After the last cycle the LR stays at the floor.
    With ``snapshot_dir``, saves ``cycle_{i}.pth`` (model state_dict) after the last epoch of cycle i.
    """
    order, run_valid = 60, False

    def __init__(self, lr_max, lr_min, cycle_epochs: list[int], warmup: int = 0, snapshot_dir=None):
        self.lr_max, self.lr_min = np.asarray(lr_max, float), np.asarray(lr_min, float)
        self.cycle_epochs, self.warmup = list(cycle_epochs), warmup
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        ends = np.cumsum(self.cycle_epochs) - 1
        self.cycle_ends = [int(e) for e in ends]  # 0-based epoch index of each cycle's last epoch
        self.snapshots: list[Path] = []

    def before_fit(self):
        self.n_batches = len(self.dls.train)
        if self.n_batches == 0:
            raise ValueError("the training DataLoader has no batches; check the data and bs (drop_last?)")
        cycle_batches = [e * self.n_batches for e in self.cycle_epochs]
        warmup = _check_warmup(self.warmup, cycle_batches[0])
        self.table = _sgdr_table(cycle_batches, self.lr_max, self.lr_min, warmup)
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)

    def before_epoch(self):
        self._trained = False

    def before_batch(self):
        pos = min(self.epoch * self.n_batches + self.iter, len(self.table) - 1)  # whole batches, no floats
        self.opt.set_hyper("lr", self.table[pos].tolist())

    def after_train(self):
        self._trained = True  # skipped epochs (start_epoch) never reach after_train

    def after_epoch(self):
        if self.snapshot_dir is None or not self._trained or self.epoch not in self.cycle_ends:
            return
        path = self.snapshot_dir / f"cycle_{self.cycle_ends.index(self.epoch)}.pth"
        _save_state_dict(self.model, path)
        self.snapshots.append(path)


def fit_sgdr(learn, n_cycles: int, cycle_len: float, lr_max=None, cycle_mult: float = 2, lr_min: float = 0.0,
             lr_min_div: float | None = None, warmup: int = 0, wd=None, snapshot_dir=None, cbs=None,
             start_cycle: int = 0, reset_opt: bool = False) -> list[int]:
    """SGDR (Loshchilov & Hutter 2017): per-batch cosine from lr_max to a floor, restarting every cycle.

    Cycle i lasts ``cycle_len * cycle_mult**i`` epochs, rounded to whole epochs (see sgdr_cycle_lengths).
    ``lr_max``: float, slice or per-group LRs (see resolve_lrs). The floor is ``lr_min`` for the last group
    (or ``lr_max/lr_min_div``), scaled for earlier groups so the group ratios hold all along.
    ``warmup``: batches of linear ramp at the start of the first cycle only (the cycle keeps its length).
    Momentum stays at the optimizer's current value (no momentum schedule, as in the SGDR paper).
    ``start_cycle`` resumes at that cycle (earlier epochs are skipped, fastai's start_epoch).
    LRs used are in ``learn.recorder.lrs``. Returns the 0-based epoch index where each trained cycle ends.
    """
    _check_sgdr(n_cycles, cycle_len, cycle_mult)
    if not isinstance(start_cycle, (int, np.integer)) or not 0 <= start_cycle < n_cycles:
        raise ValueError(f"start_cycle={start_cycle!r} must be an integer in [0, n_cycles={n_cycles})")
    _check_hypers(learn, ("lr",), "use an optimizer with a learning rate")
    lrs = resolve_lrs(learn, lr_max)
    if lr_min_div is not None:
        if lr_min:
            raise ValueError("pass either lr_min or lr_min_div, not both")
        lr_min = lrs[-1] / _check_positive("lr_min_div", lr_min_div)
    if not 0 <= lr_min <= lrs[-1]:
        raise ValueError(f"lr_min={lr_min!r} must be in [0, {lrs[-1]}] (the last group's lr_max)")
    floors = lrs * (lr_min / lrs[-1])
    epochs = sgdr_cycle_lengths(n_cycles, cycle_len, cycle_mult)
    sched = SGDRScheduler(lrs, floors, epochs, warmup=warmup, snapshot_dir=snapshot_dir)
    learn.fit(sum(epochs), lr=lrs.tolist(), wd=wd, cbs=L(sched) + L(cbs), reset_opt=reset_opt,
              start_epoch=sum(epochs[:start_cycle]))
    return sched.cycle_ends[start_cycle:]


# ----------------------------------------------------------------------------- SGDR until it overfits

class ValidateAtFitEnd(Callback):
    """Skip validation on every epoch but a fit's last (fastai's CancelValidException; the epoch's row
    then has its training loss only). One SGDR cycle per fit: validation at the cycle ends only, where
    the LR has annealed; mid-cycle weights at a high LR are not kept anyway."""

    order = 61  # after fastai's ProgressCallback (60) has opened the validation bar that after_validate closes

    def before_validate(self):
        if self.epoch < self.n_epoch - 1:
            raise CancelValidException


@dataclass
class OverfitProgress:
    """Where `fit_until_overfit` stands: whole cycles and epochs trained, the best validation loss of
    those cycles (`prev`), and why it stopped (None while it goes on). Plain numbers: a checkpoint."""

    cycles: int = 0
    epochs: int = 0
    prev: float = math.inf
    reason: str | None = None


def _check_epochs_max(epochs_max) -> None:
    if isinstance(epochs_max, bool) or not isinstance(epochs_max, int) or epochs_max < 1:
        raise ValueError(f"epochs_max={epochs_max!r} must be an integer >= 1")


def _next_cycle(learn, lr_max, epochs_max, lengths, cbs, best: BestWeights, progress: OverfitProgress) -> bool:
    """Train the next cycle unless there is none or it would pass epochs_max; update `progress`.
    True if it trained."""
    if progress.cycles >= len(lengths):
        progress.reason = f"the {len(lengths)} planned cycle(s) of {lengths} epochs are done"
        return False
    length = lengths[progress.cycles]
    if progress.epochs + length > epochs_max:
        progress.reason = f"the next cycle ({length} epochs) would pass epochs_max={epochs_max}"
        return False  # a cycle that would pass epochs_max is never started, whatever the losses
    print(f"  cycle {progress.cycles + 1}: {length} epoch(s)", flush=True)
    best.offset, n_seen = progress.epochs, len(best.losses)
    fit_sgdr(learn, n_cycles=1, cycle_len=length, lr_max=lr_max, cbs=[best, *cbs])
    progress.epochs, progress.cycles = progress.epochs + length, progress.cycles + 1
    cur = min(best.losses[n_seen:], default=math.nan)
    if not cur < progress.prev:  # also stops on a non-finite loss
        progress.reason = (f"validation loss did not improve in cycle {progress.cycles} "
                           f"({cur:.4f} vs {progress.prev:.4f}): it starts to overfit")
    else:
        progress.prev = cur
    return True


def _revised_lengths(lengths: list[int], revised, n_done: int) -> list[int]:
    """`revised` as the new cycle lengths: ValueError unless it keeps the `n_done` trained ones."""
    revised = list(revised)
    if revised[:n_done] != lengths[:n_done] or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in revised):
        raise ValueError(f"after_cycle returned {revised!r}: cycle lengths must be whole epochs >= 1 and keep "
                         f"the {n_done} trained cycle(s) {lengths[:n_done]} as they were")
    return revised


def _max_cycles(epochs_max: int, cycle_len, cycle_mult) -> int:
    """Cycles up to the first one that would pass epochs_max (that one included: it is never run)."""
    n = 1
    while sgdr_epochs(n, cycle_len, cycle_mult) <= epochs_max:
        n += 1
    return n


def fit_until_overfit(learn, lr_max, epochs_max: int, cycle_len: int = 1, cycle_mult: int = 2, cbs=None,
                      baseline: float | None = None, valid_every_epoch: bool = True,
                      best: BestWeights | None = None, progress: OverfitProgress | None = None,
                      after_cycle=None, cycle_lengths: list[int] | None = None) -> dict:
    """SGDR cycles of cycle_len, cycle_len*cycle_mult, ... epochs while validation loss improves.

    The first cycle always runs; each later one runs only if the cycle before it lowered the best
    validation loss of this fit (when it did not, the model has started to overfit), and never past
    `epochs_max`. Then the best weights seen are loaded from an in-memory copy (`BestWeights`); the
    starting weights (validation loss `baseline`, measured when None) are a candidate too, so a
    fine-tune that never helps leaves the model as it was. `valid_every_epoch=False` validates only at
    the end of each cycle (the SGDR snapshots; then only those are candidates).
    `cycle_lengths`: the epochs of each cycle, instead of cycle_len * cycle_mult**i (a time budget's
    plan; still whole cycles, still stopped when one does not improve). Resuming: pass the `best` and
    `progress` saved after a cycle. `after_cycle(progress, best)` is called after every trained cycle
    (the recipe writes its checkpoint there); when it returns a list, that list is the cycle lengths from
    then on (the trained ones unchanged: a time budget re-planned with the epoch times measured so far).
    Returns {cycles, epochs, best_valid_loss, best_epoch, reason}.
    """
    _check_epochs_max(epochs_max)
    if cycle_lengths is not None and (not cycle_lengths or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in cycle_lengths)):
        raise ValueError(f"cycle_lengths={cycle_lengths!r} must be a non-empty list of whole epochs >= 1")
    lengths = list(cycle_lengths) if cycle_lengths is not None else sgdr_cycle_lengths(
        _max_cycles(epochs_max, cycle_len, cycle_mult), cycle_len, cycle_mult)
    if best is None:
        best = BestWeights(learn.model, float(learn.validate()[0]) if baseline is None else baseline)
    progress = progress if progress is not None else OverfitProgress()
    cbs = [*(cbs or []), *([] if valid_every_epoch else [ValidateAtFitEnd()])]
    while progress.reason is None:
        if _next_cycle(learn, lr_max, epochs_max, lengths, cbs, best, progress) and after_cycle:
            revised = after_cycle(progress, best)
            if revised is not None:
                lengths = _revised_lengths(lengths, revised, progress.cycles)
    best.restore(learn.model)
    return {"cycles": progress.cycles, "epochs": progress.epochs,
            "best_valid_loss": best.best if math.isfinite(best.best) else None,
            "best_epoch": best.best_epoch, "reason": progress.reason}


# ----------------------------------------------------------------------------- previews for the notebooks

SCHEDULE_KINDS = ("constant", "step", "exponential", "inverse_time", "one_cycle", "sgdr")

_PREVIEW_PARAMS = {  # defaults; t and the step/cycle lengths are in iterations
    "constant": {},
    "step": {"step_size": None, "gamma": 0.1},  # step_size None -> n_iter // 3
    "exponential": {"k": None},  # lr0 * exp(-k t); None -> 4 / n_iter (ends near lr0/55)
    "inverse_time": {"k": None},  # lr0 / (1 + k t); None -> 9 / n_iter (ends near lr0/10)
    "one_cycle": {"pct_start": 0.25, "div": 25.0, "div_final": 1e5},  # fastai's defaults
    "sgdr": {"cycle_len": None, "cycle_mult": 2, "lr_min": 0.0},  # cycle_len None -> n_iter // 7
}


def schedule_preview(kind: str, n_iter: int, lr_max: float, **params) -> np.ndarray:
    """Per-iteration LRs (length n_iter) of a named schedule; see SCHEDULE_KINDS and _PREVIEW_PARAMS."""
    if kind not in _PREVIEW_PARAMS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {', '.join(SCHEDULE_KINDS)}")
    unknown = set(params) - set(_PREVIEW_PARAMS[kind])
    if unknown:
        raise ValueError(f"{kind!r} takes {sorted(_PREVIEW_PARAMS[kind])}, not {sorted(unknown)}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter={n_iter!r} must be an integer >= 1")
    lr_max = _check_positive("lr_max", lr_max)
    p = {**_PREVIEW_PARAMS[kind], **params}
    t = np.arange(n_iter, dtype=float)
    if kind == "constant":
        return np.full(n_iter, lr_max)
    if kind == "step":
        step = p["step_size"] or max(1, n_iter // 3)
        return lr_max * p["gamma"] ** (t // step)
    if kind == "exponential":
        k = 4.0 / n_iter if p["k"] is None else p["k"]
        return lr_max * np.exp(-k * t)
    if kind == "inverse_time":
        k = 9.0 / n_iter if p["k"] is None else p["k"]
        return lr_max / (1 + k * t)
    if kind == "one_cycle":  # fastai's own schedule at pct_train = t / n_iter
        f = combined_cos(p["pct_start"], lr_max / p["div"], lr_max, lr_max / p["div_final"])
        return np.array([f(pos) for pos in t / n_iter])
    cycle_len = p["cycle_len"] or max(1, n_iter // 7)  # sgdr: enough cycles to cover n_iter, then cut
    n_cycles = 1
    while sgdr_epochs(n_cycles, cycle_len, p["cycle_mult"]) < n_iter:
        n_cycles += 1
    lrs = sgdr_lrs(n_cycles, cycle_len, 1, lr_max, p["cycle_mult"], p["lr_min"])
    return lrs[:n_iter]


def plot_schedules(schedules: dict, path=None, log_y: bool = False):
    """Plot named per-iteration LR arrays on one axis; saves a PNG when ``path`` is given. Returns the Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global state, works headless (Agg)

    if not schedules:
        raise ValueError("schedules is empty; pass {name: lrs}, e.g. {'sgdr': schedule_preview('sgdr', 100, 0.1)}")
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, lrs in schedules.items():
        ax.plot(np.asarray(lrs), label=str(name))
    ax.set_xlabel("iteration (batch)")
    ax.set_ylabel("learning rate")
    if log_y:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        save_png(fig, path)
    return fig
