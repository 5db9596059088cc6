"""Training callbacks the seed projects used, made to work with fastai schedules and wrapped optimizers.

- `HardExampleMining`: up-weights the hardest examples of each training batch.
- `PlateauLR`: reduce-LR-on-plateau that survives per-batch schedulers and `OptimWrapper` (fastai #4046).
- `EarlyStopping`: early stopping that can restore the best weights.
- `BestCheckpoint`: atomic best-model saving that never overwrites the best with a worse or NaN model.
- `NonFiniteGuard`: stops training *before* an optimizer step applies a non-finite loss or gradient.
- `ProgressiveResize`: progressive resizing, training batches shrunk to a smaller size while asked to.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import ParamScheduler
from fastai.callback.tracker import TrackerCallback

from fastlesson._io import atomic_write

__all__ = ["HardExampleMining", "PlateauLR", "BestWeights", "EarlyStopping", "BestCheckpoint", "NonFiniteGuard",
           "ProgressiveResize", "average_states"]


def _supports_reduction(loss_func) -> bool:
    """True when `loss_func` can return per-example losses (a `reduction` attribute or keyword)."""
    if hasattr(loss_func, "reduction"):
        return True
    try:
        return "reduction" in inspect.signature(loss_func).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _per_example_loss(loss_func, pred, *yb) -> torch.Tensor:
    """`loss_func(pred, *yb)` with reduction='none' (fastai's `Learner.loss_not_reduced`, without a Learner)."""
    if hasattr(loss_func, "reduction"):
        old = loss_func.reduction
        loss_func.reduction = "none"
        try:
            return loss_func(pred, *yb)
        finally:
            loss_func.reduction = old
    return loss_func(pred, *yb, reduction="none")


class HardExampleMining(Callback):
    """Each training batch, give the `ceil(frac * n)` highest-loss examples weight `weight`, the rest 1.

    With per-example losses l_i (the loss function called with reduction='none') and weights w_i,
    the loss that is back-propagated is the weighted mean  sum(w_i * l_i) / sum(w_i),
    so its scale stays that of a mean loss and the learning rate keeps its meaning.
    `learn.loss` (what the Recorder logs as train_loss) stays the loss function's own value, so
    runs with and without mining log comparable numbers. No effect during validation, nor in the first
    `warmup_epochs` epochs. After each weighted batch, `last_hard_idx` holds the batch indices that were
    up-weighted and `last_weights` the weights w_i.
    """

    order = MixedPrecision.order + 1  # after MixedPrecision.after_loss has left autocast: losses in fp32
    run_valid = False

    def __init__(self, frac: float = 0.25, weight: float = 2.0, warmup_epochs: int = 0):
        if not 0 < frac <= 1:
            raise ValueError(f"frac={frac!r}: the fraction of hard examples must be in (0, 1], e.g. 0.25")
        if not weight > 0:
            raise ValueError(f"weight={weight!r}: the weight of hard examples must be > 0, e.g. 2.0")
        if warmup_epochs < 0 or int(warmup_epochs) != warmup_epochs:
            raise ValueError(f"warmup_epochs={warmup_epochs!r}: must be a whole number >= 0")
        self.frac, self.weight, self.warmup_epochs = float(frac), float(weight), int(warmup_epochs)
        self.last_hard_idx, self.last_weights = None, None

    def before_fit(self):
        if not _supports_reduction(self.learn.loss_func):
            raise ValueError(
                f"HardExampleMining needs a loss that can return per-example losses (a `reduction` "
                f"attribute or keyword), got {self.learn.loss_func!r}; use e.g. CrossEntropyLossFlat(), "
                f"LabelSmoothingCrossEntropyFlat() or nn.CrossEntropyLoss()")

    def after_loss(self):
        if self.epoch < self.warmup_epochs or not len(self.learn.yb):
            return
        losses = _per_example_loss(self.learn.loss_func, self.learn.pred, *self.learn.yb)
        n = self.learn.pred.shape[0]
        if losses.is_floating_point():  # fp16 losses: their weighted sum overflows past 65504
            losses = losses.float()
        if losses.ndim != 1 or losses.shape[0] != n:
            raise ValueError(
                f"HardExampleMining needs one loss per example ({n}), the loss function gave shape "
                f"{tuple(losses.shape)}; use a classification loss such as CrossEntropyLossFlat()")
        k = math.ceil(self.frac * n)
        hard = losses.detach().topk(k).indices
        w = torch.ones_like(losses)
        w[hard] = self.weight
        self.learn.loss_grad = (w * losses).sum() / w.sum()
        self.last_hard_idx, self.last_weights = hard.cpu(), w.detach().cpu()


def _check_monitor(cb: TrackerCallback):
    """ValueError naming the recorded values when `cb.monitor` is not one of them."""
    names = list(cb.recorder.metric_names[1:])
    if cb.monitor not in names:
        raise ValueError(f"monitor={cb.monitor!r} is not recorded; choose one of {names} "
                         f"(metrics are named after their function, e.g. 'accuracy')")


class PlateauLR(TrackerCallback):
    """Multiply every group's LR by `factor` when `monitor` has not improved for `patience` epochs.

    Works under per-batch schedulers (fit_one_cycle, fit_sgdr) and `OptimWrapper`/Lookahead optimizers:
    it keeps a multiplicative `scale` and, ordered after the scheduler, sets each group's
    lr = max(lr_sched * scale, min(lr_sched, min_lr)) via `opt.set_hyper` before each training batch,
    then restores lr_sched after the step so a constant LR does not compound. So the reduction scales
    the schedule, and `min_lr` (float or one per group) floors the reduced LR but never raises
    the schedule's own LR. The `cooldown` epochs after a reduction do not count towards patience
    (torch's ReduceLROnPlateau semantics). `reductions` lists (epoch, scale) for each reduction.
    """

    order = ParamScheduler.order + 1  # after the scheduler's before_batch (SGDRScheduler has the same order)
    run_valid = False

    def __init__(self, monitor: str = "valid_loss", patience: int = 2, factor: float = 0.2,
                 min_lr: float | list[float] = 0.0, cooldown: int = 0, min_delta: float = 0.0,
                 comp=None, reset_on_fit: bool = True):
        if not 0 < factor < 1:
            raise ValueError(f"factor={factor!r}: the LR is multiplied by factor, so it must be in (0, 1), e.g. 0.2")
        if patience < 1 or cooldown < 0:
            raise ValueError(f"patience={patience!r}, cooldown={cooldown!r}: need patience >= 1 and cooldown >= 0")
        if np.any(np.asarray(min_lr, dtype=float) < 0):
            raise ValueError(f"min_lr={min_lr!r}: must be >= 0")
        super().__init__(monitor=monitor, comp=comp, min_delta=min_delta, reset_on_fit=reset_on_fit)
        self.patience, self.factor, self.min_lr, self.cooldown = patience, factor, min_lr, cooldown
        self.scale, self.reductions, self._base = 1.0, [], None

    def before_fit(self):
        _check_monitor(self)  # before fastai's bare assert
        super().before_fit()
        self.wait, self.cooldown_left, self._base = 0, 0, None
        if self.reset_on_fit:
            self.scale, self.reductions = 1.0, []

    def before_batch(self):
        if self.scale == 1.0:
            return
        base = np.array([h["lr"] for h in self.opt.hypers], dtype=float)
        floor = np.minimum(base, np.broadcast_to(np.asarray(self.min_lr, dtype=float), base.shape))
        self.opt.set_hyper("lr", np.maximum(base * self.scale, floor))
        self._base = base

    def after_batch(self):
        self._restore()

    def after_fit(self):
        self._restore()  # a CancelFitException inside a batch skips after_batch
        super().after_fit()

    def _restore(self):
        if self._base is not None:
            self.opt.set_hyper("lr", self._base)
            self._base = None

    def after_epoch(self):
        super().after_epoch()
        self.wait = 0 if self.new_best else self.wait + 1
        if self.cooldown_left > 0:  # epochs in cooldown do not count towards patience
            self.cooldown_left -= 1
            self.wait = 0
        if self.wait >= self.patience:
            self.scale *= self.factor
            self.reductions.append((self.epoch, self.scale))
            self.wait, self.cooldown_left = 0, self.cooldown
            print(f"Epoch {self.epoch}: {self.monitor} plateaued, LR scale now {self.scale:.3g}")


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An in-memory copy of the model's state_dict on the CPU (so GPU memory is not doubled)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The equal-weight average of state_dicts (the weights of stochastic weight averaging, Izmailov et
    al. 2018, as torch.optim.swa_utils.AveragedModel computes them, buffers included); integer buffers
    (BatchNorm's num_batches_tracked) are the last state's. ValueError for none or mismatched keys."""
    if not states:
        raise ValueError("average_states needs at least one state_dict")
    keys = set(states[-1])  # as sets: a state_dict read back from safetensors has its keys sorted
    if any(set(s) != keys for s in states):
        raise ValueError("average_states: the state_dicts have different keys (not the same model)")
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point()
            else v.clone() for k, v in states[-1].items()}


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class BestWeights(Callback):
    """The one best-weights mechanism: an in-memory (CPU) copy of the weights at the lowest loss seen.

    `offer(loss, model, epoch)` keeps a copy when `loss` is finite and beats `best` (the copy never
    doubles GPU memory); `restore(model)` loads it back. Shared by `EarlyStopping` and the recipe's
    `fit_until_overfit`. As a callback (after fastai's Recorder) it offers each validated epoch's
    validation loss, across several fits: `losses` lists them (NaN for a non-finite one), `best_epoch`
    is 1-based over those fits (`offset` = epochs before the current fit; 0 = the starting weights,
    when `model` and `best` give them as a candidate). Epochs not validated (`ValidateAtFitEnd`) are
    not candidates.
    """

    order = 52  # after Recorder (50) and the recipe's run log (51)

    def __init__(self, model=None, best: float = math.inf):
        self.best = float(best)
        self.state = state_copy(model) if model is not None else None
        self.losses: list[float] = []
        self.offset, self.best_epoch = 0, 0

    def offer(self, loss: float, model, epoch) -> bool:
        """Keep a copy of `model` if `loss` is a new best; True when it was."""
        if not (math.isfinite(loss) and loss < self.best):
            return False
        self.best, self.state, self.best_epoch = float(loss), state_copy(model), epoch
        return True

    def keep(self, model, epoch) -> None:
        """Keep a copy of `model` unconditionally (the caller has decided it is the best)."""
        self.state, self.best_epoch = state_copy(model), epoch

    def restore(self, model) -> bool:
        """Load the kept weights into `model` (in place); False when nothing was kept."""
        if self.state is None:
            return False
        model.load_state_dict(self.state)
        return True

    def after_epoch(self):
        if getattr(self.recorder, "cancel_valid", False):
            return  # not validated (ValidateAtFitEnd): not a candidate
        loss = float(self.recorder.values[-1][1]) if self.recorder.values else math.nan
        self.losses.append(loss if math.isfinite(loss) else math.nan)
        self.offer(loss, self.model, self.offset + self.epoch + 1)


class EarlyStopping(TrackerCallback):
    """Stop when `monitor` has not improved for `patience` epochs; optionally restore the best weights.

    With `restore_best_weights`, an in-memory (CPU) copy of the state_dict is kept at each new best
    epoch (`BestWeights`) and loaded back at the end of fit, also when training stops early. fastai's
    `EarlyStoppingCallback` leaves the last epoch's weights. `best_epoch` and `stopped_epoch` record
    what happened (None when it did not).
    """

    order = TrackerCallback.order + 3  # after BestCheckpoint/PlateauLR, like fastai's

    def __init__(self, monitor: str = "valid_loss", patience: int = 3, min_delta: float = 0.0,
                 restore_best_weights: bool = True, comp=None, reset_on_fit: bool = True):
        if patience < 1:
            raise ValueError(f"patience={patience!r}: must be >= 1 epoch")
        super().__init__(monitor=monitor, comp=comp, min_delta=min_delta, reset_on_fit=reset_on_fit)
        self.patience, self.restore_best_weights = patience, restore_best_weights
        self.kept, self.best_epoch, self.stopped_epoch = BestWeights(), None, None

    @property
    def best_state(self) -> dict | None:
        """The kept copy of the best weights (None before any)."""
        return self.kept.state

    def before_fit(self):
        _check_monitor(self)  # before fastai's bare assert
        super().before_fit()
        self.wait, self.stopped_epoch = 0, None
        if self.reset_on_fit:
            self.kept, self.best_epoch = BestWeights(), None

    def after_epoch(self):
        super().after_epoch()
        if self.new_best:
            self.wait, self.best_epoch = 0, self.epoch
            if self.restore_best_weights:
                self.kept.keep(self.learn.model, self.epoch)  # TrackerCallback's comp/min_delta decided
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = self.epoch
            print(f"No improvement in {self.monitor} since epoch {self.best_epoch}: early stopping")
            raise CancelFitException()

    def after_fit(self):
        if self.restore_best_weights:
            self.kept.restore(self.learn.model)
        super().after_fit()


def atomic_torch_save(obj, path: Path):
    """torch.save to a temporary file in the same folder, fsync, then os.replace onto `path`."""
    return atomic_write(path, lambda p: torch.save(obj, p), fsync=True)


class BestCheckpoint(TrackerCallback):
    """Save the model's state_dict to `path` whenever `monitor` improves, atomically.

    `path` is used as is when absolute, else relative to `learn.path/learn.model_dir`; '.pth' is added
    when it has no suffix. The file is written to a temporary file then renamed, so a crash while
    saving leaves the previous best intact; it is loadable with `torch.load(path, weights_only=True)`.
    A worse or NaN `monitor` value never triggers a save, nor do weights with non-finite values.
    With `reset_on_fit=False` (the default) the best value carries over between fits of the same
    callback; `load_best=True` loads the best weights back at the end of fit.
    """

    order = TrackerCallback.order + 1  # like fastai's SaveModelCallback

    def __init__(self, path: str | os.PathLike = "best.pth", monitor: str = "valid_loss",
                 min_delta: float = 0.0, comp=None, load_best: bool = False, reset_on_fit: bool = False):
        super().__init__(monitor=monitor, comp=comp, min_delta=min_delta, reset_on_fit=reset_on_fit)
        self.fname, self.load_best = Path(path), load_best
        self.saved_path, self.best_epoch = None, None

    def _resolve(self) -> Path:
        p = self.fname if self.fname.suffix else self.fname.with_suffix(".pth")
        return p if p.is_absolute() else Path(self.learn.path) / self.learn.model_dir / p

    def before_fit(self):
        _check_monitor(self)  # before fastai's bare assert
        super().before_fit()

    def after_epoch(self):
        prev_best = self.best
        super().after_epoch()
        if not self.new_best:
            return
        state = state_copy(self.learn.model)
        if not _all_finite(state):
            self.best, self.new_best = prev_best, False  # never let NaN weights become "the best"
            warnings.warn(f"epoch {self.epoch}: weights contain non-finite values, checkpoint not saved",
                          stacklevel=2)
            return
        path = self._resolve()
        atomic_torch_save(state, path)
        self.saved_path, self.best_epoch = path, self.epoch

    def after_fit(self):
        if self.load_best and self.saved_path is not None:
            self.learn.model.load_state_dict(torch.load(self.saved_path, weights_only=True))
        super().after_fit()


class NonFiniteGuard(Callback):
    """Stop training before an optimizer step applies a non-finite loss (and, with `check_grads`, gradients).

    Checks the back-propagated loss in after_loss (after `HardExampleMining` has set it) and the
    gradients in before_step (after MixedPrecision, whose GradScaler already skips its own overflow
    steps), then raises CancelFitException, so the weights stay those of the last finite step
    (BatchNorm running statistics, which the bad forward pass already changed, are put back too).
    fastai's `TerminateOnNaNCallback` checks in after_batch, after the step has written NaN weights.
    `stop_reason` says what happened ('' when nothing did).
    """

    order = HardExampleMining.order + 1
    run_valid = False

    def __init__(self, check_grads: bool = True):
        self.check_grads, self.stop_reason, self._saved_buffers = check_grads, "", None

    def before_fit(self):
        self.stop_reason = ""

    def before_batch(self):
        # the forward pass already updates BatchNorm running stats; keep them to undo a NaN batch (small)
        self._saved_buffers = [b.detach().clone() for b in self.learn.model.buffers()]

    def _stop(self, what: str):
        with torch.no_grad():
            for b, saved in zip(self.learn.model.buffers(), self._saved_buffers or []):
                b.copy_(saved)
        self.stop_reason = f"non-finite {what} at epoch {self.epoch}, batch {self.iter}"
        warnings.warn(f"{self.stop_reason}: training stopped before the optimizer step", stacklevel=2)
        raise CancelFitException()

    def after_loss(self):
        loss = getattr(self.learn, "loss_grad", None)
        if loss is not None and not torch.isfinite(loss).all():
            self._stop("loss")

    def before_step(self):
        if not self.check_grads:
            return
        for p in self.learn.model.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                self._stop("gradient")


class ProgressiveResize(Callback):
    """Progressive resizing (fast.ai's DAWNBench recipe): while `active()` is true, every training batch is
    resized to `size` px (bilinear, antialiased) after the data pipeline's crops and augmentation, so the
    model trains on smaller inputs, faster, and validation stays at the data's size.

    Resizing the augmented batch (as fastxtend's ProgressiveResize does) keeps the crops' content what
    the data pipeline made, and it needs no second set of DataLoaders. `active` is asked at the start of each
    training pass; `small` records its answer for every pass (the recipe times the two sizes apart).
    """

    order = 1  # after fastai's ChannelsLast (-1), before the model sees the batch
    run_valid = False

    def __init__(self, size: int, active=lambda: True):
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"size={size!r} must be an image side in pixels (int >= 2), e.g. 128")
        self.size, self.active, self.small, self._on = size, active, [], False

    def before_train(self):
        self._on = bool(self.active())
        self.small.append(self._on)

    def before_batch(self):
        if not self._on or not self.training:
            return
        x = self.learn.xb[0]
        if x.ndim != 4 or tuple(x.shape[-2:]) == (self.size, self.size):
            return
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        small = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)
        self.learn.xb = (small.contiguous(memory_format=fmt), *self.learn.xb[1:])
