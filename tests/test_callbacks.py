"""Callbacks: exact hard-example weighting, and plateau/early-stop/checkpoint/NaN callbacks vs plain fastai."""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.callback.tracker import (
    EarlyStoppingCallback,
    ReduceLROnPlateau,
    SaveModelCallback,
    TerminateOnNaNCallback,
)
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.optimizer import SGD, OptimWrapper
from torch import nn
from torch.utils.data import TensorDataset

from fastlesson.callbacks import (
    BestCheckpoint,
    BestWeights,
    EarlyStopping,
    HardExampleMining,
    NonFiniteGuard,
    PlateauLR,
    ProgressiveResize,
)

NB = 2  # batches per epoch of the tiny learner below: 32 examples / bs 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared, busy CPU run far faster on one thread (many fits in this file)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny(tiny_learner):
    """conftest's tiny learner, smaller, with in-process data loading (no worker fork per epoch)."""
    def make(**kw):
        learn = tiny_learner(n_train=32, n_valid=16, size=8, **kw)
        for dl in learn.dls.loaders:
            dl.fake_l.num_workers = 0
        return learn
    return make


# ---------- helpers ----------

class FeedMonitor(Callback):
    """Overwrite the monitored value of each epoch with a fixed sequence (runs after Recorder, before trackers)."""
    order = 55

    def __init__(self, values, monitor="valid_loss"):
        self.values, self.monitor = values, monitor

    def after_epoch(self):
        idx = list(self.recorder.metric_names[1:]).index(self.monitor)
        self.recorder.values[-1][idx] = self.values[self.epoch]


class ProbeLR(Callback):
    """Record the LR each torch param group really has when the optimizer steps."""
    order = 90

    def before_fit(self):
        self.lrs = []

    def before_step(self):
        opt = self.learn.opt
        groups = opt.opt.param_groups if isinstance(opt, OptimWrapper) else None
        if groups is not None:
            self.lrs.append([g["lr"] for g in groups])
        else:
            self.lrs.append([h["lr"] for h in opt.hypers])


class SnapEpochs(Callback):
    """Copy the weights at the end of every epoch."""
    order = 50

    def before_fit(self):
        self.snaps = []

    def after_epoch(self):
        self.snaps.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items()})


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def current_state(learn):
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


# ---------- HardExampleMining ----------

LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
TARGETS = torch.tensor([0, 1, 2, 0])


def hand_ce():
    """Cross-entropy of LOGITS/TARGETS written out by hand: logsumexp(x) - x[y]."""
    rows = LOGITS.tolist()
    return [math.log(sum(math.exp(v) for v in r)) - r[int(y)] for r, y in zip(rows, TARGETS)]


def hand_ls(eps=0.1):
    """fastai's label-smoothing CE per example: (1-eps)*nll + eps/c * sum_j -log p_j."""
    out = []
    for r, y in zip(LOGITS.tolist(), TARGETS):
        lse = math.log(sum(math.exp(v) for v in r))
        logp = [v - lse for v in r]
        out.append((1 - eps) * -logp[int(y)] + eps / len(r) * -sum(logp))
    return out


class Scale(nn.Module):
    """pred = x * p with p = 1: the predictions are exactly the hand-made logits."""
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.p


class ProbeLoss(Callback):
    """Record what is back-propagated, what is logged, and the gradient it produces."""
    order = 50

    def before_fit(self):
        self.rows = []

    def after_loss(self):
        self.rows.append(dict(training=self.training, epoch=self.epoch,
                              loss_grad=float(self.learn.loss_grad.detach()), loss=float(self.learn.loss.detach())))

    def after_backward(self):
        self.rows[-1]["grad"] = float(self.learn.model.p.grad)


def hand_learner(loss_func, cbs=()):
    ds = TensorDataset(LOGITS.clone(), TARGETS.clone())
    dls = DataLoaders.from_dsets(ds, ds, bs=4, shuffle=False, device="cpu", num_workers=0)
    return Learner(dls, Scale(), loss_func=loss_func, opt_func=SGD, lr=0.0, cbs=list(cbs))


LOSSES = {
    "CrossEntropyLossFlat": (CrossEntropyLossFlat, hand_ce),
    "nn.CrossEntropyLoss": (nn.CrossEntropyLoss, hand_ce),
    "F.cross_entropy": (lambda: F.cross_entropy, hand_ce),
    "LabelSmoothingCrossEntropyFlat": (LabelSmoothingCrossEntropyFlat, hand_ls),
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("frac,weight,hard", [(0.5, 3.0, {2, 3}), (0.25, 2.0, {3}), (0.3, 4.0, {2, 3}),
                                              (1.0, 3.0, {0, 1, 2, 3}), (0.25, 0.5, {3})])  # bounds, down-weight
def test_hard_mining_weighting_exact(loss_name, frac, weight, hard):
    make_loss, hand = LOSSES[loss_name]
    probe, hem = ProbeLoss(), HardExampleMining(frac=frac, weight=weight)
    learn = hand_learner(make_loss(), cbs=[hem, probe])
    learn.fit(1)
    l = hand()  # noqa: E741
    w = [weight if i in hard else 1.0 for i in range(4)]
    expected = sum(wi * li for wi, li in zip(w, l)) / sum(w)
    train = [r for r in probe.rows if r["training"]][0]
    assert set(hem.last_hard_idx.tolist()) == hard  # ceil(frac * 4) highest-loss examples
    assert hem.last_weights.tolist() == w
    assert train["loss_grad"] == pytest.approx(expected, abs=1e-6)
    assert train["loss"] == pytest.approx(sum(l) / 4, abs=1e-6)  # logged train loss unchanged
    # the weighted loss is what is back-propagated: its gradient w.r.t. p by autograd
    p = torch.ones((), requires_grad=True)
    losses = F.cross_entropy(LOGITS * p, TARGETS, reduction="none") if hand is hand_ce else \
        LabelSmoothingCrossEntropyFlat(reduction="none")(LOGITS * p, TARGETS)
    ((torch.tensor(w) * losses).sum() / sum(w)).backward()
    assert train["grad"] == pytest.approx(float(p.grad), abs=1e-6)


def test_hard_mining_defaults_double_the_hardest_quarter():
    hem = HardExampleMining()
    hand_learner(CrossEntropyLossFlat(), cbs=[hem]).fit(1)
    assert hem.last_weights.tolist() == [1.0, 1.0, 1.0, 2.0]  # ceil(0.25 * 4) = 1 (the hardest) at weight 2


def test_hard_mining_warmup_and_validation_unaffected():
    probe = ProbeLoss()
    learn = hand_learner(CrossEntropyLossFlat(), cbs=[HardExampleMining(0.5, 3.0, warmup_epochs=1), probe])
    learn.fit(2)
    l = hand_ce()  # noqa: E741
    mean, weighted = sum(l) / 4, (l[0] + l[1] + 3 * l[2] + 3 * l[3]) / 8
    train = [r for r in probe.rows if r["training"]]
    valid = [r for r in probe.rows if not r["training"]]
    assert train[0]["epoch"] == 0 and train[0]["loss_grad"] == pytest.approx(mean, abs=1e-6)  # warm-up
    assert train[1]["epoch"] == 1 and train[1]["loss_grad"] == pytest.approx(weighted, abs=1e-6)
    assert len(valid) == 2 and all(r["loss_grad"] == pytest.approx(mean, abs=1e-6) for r in valid)
    assert [v[0] for v in learn.recorder.values] == pytest.approx([mean, mean], abs=1e-5)  # valid_loss (fp32 mean)


class CPUMixedPrecision(MixedPrecision):
    """fastai's MixedPrecision with autocast and GradScaler on the CPU.

    fastai hard-codes `autocast('cuda')`, which on a CPU-only machine disables itself with a warning:
    the events run but nothing is cast or scaled. Everything else (its after_pred, after_loss,
    before_backward scaling, before_step unscaling) is fastai's own.
    """

    def before_fit(self):
        dtype = torch.bfloat16 if self.amp_mode == AMPMode.BF16 else torch.float16
        self.kwargs["enabled"] = dtype == torch.float16  # fastai: no GradScaler for bf16
        self.autocast = torch.autocast("cpu", dtype=dtype)
        self.learn.scaler = torch.amp.GradScaler("cpu", init_scale=AMP_SCALE, **self.kwargs)
        self.scales = []


AMP_SCALE = 1024.0  # GradScaler's initial loss scale in the fp16 case


class Linear3(nn.Module):
    """pred = x @ W.T with W = I: a matmul, so autocast really runs it in low precision."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.eye(3))
        self.out_dtypes = []

    def forward(self, x):
        out = F.linear(x, self.w)
        self.out_dtypes.append(out.dtype)
        return out


class ProbeScaled(Callback):
    """Record loss_grad after mining, after MixedPrecision's before_backward has scaled it, and the grad."""
    order = 50

    def before_fit(self):
        self.rows, self.scaled, self.grads = [], [], []

    def after_loss(self):
        self.rows.append(dict(training=self.training, loss_grad=float(self.learn.loss_grad.detach()),
                              loss=float(self.learn.loss.detach())))

    def before_backward(self):
        self.scaled.append(float(self.learn.loss_grad.detach()))

    def after_backward(self):
        self.grads.append(self.learn.model.w.grad.detach().clone())


@pytest.mark.parametrize("amp_mode", ["bf16", "fp16"])
def test_hard_mining_under_cpu_autocast_is_what_gets_scaled_and_stepped(amp_mode):
    # MixedPrecision leaves autocast in after_loss and scales loss_grad in before_backward: mining must
    # run between the two, so the weighted loss is the one that is scaled, back-propagated and stepped.
    assert MixedPrecision.order < HardExampleMining.order
    ds = TensorDataset(LOGITS.clone(), TARGETS.clone())
    dls = DataLoaders.from_dsets(ds, ds, bs=4, shuffle=False, device="cpu", num_workers=0)
    model, lr = Linear3(), 0.5
    scaled, hem = ProbeScaled(), HardExampleMining(0.5, 3.0)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.0), lr=lr,
                    wd=0.0, cbs=[CPUMixedPrecision(amp_mode=amp_mode), hem, scaled])
    learn.fit(1)
    low = torch.bfloat16 if amp_mode == "bf16" else torch.float16
    assert model.out_dtypes[0] == low, "the forward pass really ran under autocast"
    l = hand_ce()  # noqa: E741  (LOGITS are exact in bf16 and fp16, so are the losses)
    weighted = (l[0] + l[1] + 3 * l[2] + 3 * l[3]) / 8
    train = [r for r in scaled.rows if r["training"]][0]
    assert hem.last_weights.dtype == torch.float32 and set(hem.last_hard_idx.tolist()) == {2, 3}
    assert train["loss_grad"] == pytest.approx(weighted, abs=1e-6)
    assert train["loss"] == pytest.approx(sum(l) / 4, abs=1e-6)  # logged loss: the plain mean
    scale = AMP_SCALE if amp_mode == "fp16" else 1.0
    assert scaled.scaled[0] == pytest.approx(scale * weighted, rel=1e-6)  # the weighted loss was scaled
    # reference gradient of the weighted loss w.r.t. W, in fp32 by autograd
    w0 = torch.eye(3, requires_grad=True)
    losses = F.cross_entropy(F.linear(LOGITS, w0), TARGETS, reduction="none")
    ((torch.tensor([1.0, 1.0, 3.0, 3.0]) * losses).sum() / 8).backward()
    assert torch.allclose(scaled.grads[0] / scale, w0.grad, rtol=2e-2, atol=2e-3)
    # the step used the unscaled gradient (GradScaler.unscale_ inside MixedPrecision.before_step)
    assert torch.allclose(model.w.detach(), torch.eye(3) - lr * w0.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fastai's to_fp16 autocasts on CUDA only")
def test_hard_mining_after_fastai_to_fp16_on_cuda():
    probe = ProbeScaled()
    learn = hand_learner(CrossEntropyLossFlat(), cbs=[HardExampleMining(0.5, 3.0), probe])
    learn.model = Linear3().cuda()
    learn.dls.cuda()
    learn.to_fp16()
    learn.fit(1)
    assert learn.model.out_dtypes[0] == torch.float16
    l = hand_ce()  # noqa: E741
    train = [r for r in probe.rows if r["training"]][0]
    assert train["loss_grad"] == pytest.approx((l[0] + l[1] + 3 * l[2] + 3 * l[3]) / 8, abs=1e-3)


def test_hard_mining_weighted_mean_of_fp16_losses_does_not_overflow():
    """A loss function that returns fp16 per-example losses (a model kept in half precision): the
    weighted sum of a large batch passes fp16's 65504 although the mean is small."""
    n = 4096
    pred = torch.zeros(n, 3, dtype=torch.float16)
    pred[:, 0] = 9.0  # every example confidently wrong for class 2: loss ~ 9 each, sum ~ 46000 * weights
    targ = torch.full((n,), 2)

    def half_ce(pred, targ, reduction="mean"):
        return F.cross_entropy(pred.float(), targ, reduction=reduction).half()

    hem = HardExampleMining(frac=0.5, weight=3.0)
    hem.learn = SimpleNamespace(loss_func=half_ce, pred=pred, yb=(targ,), epoch=0, loss_grad=None)
    hem.after_loss()
    expected = float(half_ce(pred, targ, reduction="none").float().mean())  # equal losses: weights cancel
    assert math.isfinite(float(hem.learn.loss_grad))
    assert float(hem.learn.loss_grad) == pytest.approx(expected, rel=1e-3)


# torch's C builtin has no readable signature (inspect raises ValueError) and no `reduction` attribute
@pytest.mark.parametrize("loss_func", [lambda pred, y: F.cross_entropy(pred, y), torch._C._nn.cross_entropy_loss])
def test_hard_mining_rejects_loss_without_per_example_losses(loss_func):
    learn = hand_learner(loss_func, cbs=[HardExampleMining()])
    with pytest.raises(ValueError, match="per-example"):
        learn.fit(1)


@pytest.mark.parametrize("reshape, shape", [(lambda ls: ls.mean(), ()), (lambda ls: ls[:, None], (4, 1))])
def test_hard_mining_rejects_a_loss_that_is_not_one_per_example(reshape, shape):
    def odd_loss(pred, targ, reduction="mean"):
        return reshape(F.cross_entropy(pred, targ, reduction="none"))

    hem = HardExampleMining(frac=0.5, weight=3.0)
    hem.learn = SimpleNamespace(loss_func=odd_loss, pred=LOGITS, yb=(TARGETS,), epoch=0, loss_grad=None)
    with pytest.raises(ValueError, match=r"\(4\).*" + re.escape(str(shape))):  # 4 examples, the shape it gave
        hem.after_loss()


@pytest.mark.parametrize("kw", [dict(frac=0), dict(frac=1.5), dict(weight=0), dict(warmup_epochs=-1)])
def test_hard_mining_bad_arguments(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        HardExampleMining(**kw)


# ---------- PlateauLR ----------

FLAT = [1.0] * 10  # a monitored value that never improves after epoch 0


def one_cycle_lrs(tiny, *cbs, opt_func=None):
    kw = {} if opt_func is None else dict(opt_func=opt_func)
    learn = tiny(**kw)
    probe = ProbeLR()
    learn.fit_one_cycle(4, slice(1e-3, 1e-2), cbs=[FeedMonitor(FLAT), probe, *cbs])
    return np.array(probe.lrs), np.array(learn.recorder.lrs)


def test_plateau_lowers_lr_under_one_cycle_fastai_does_not(tiny):
    ref, _ = one_cycle_lrs(tiny)
    fastai_lrs, _ = one_cycle_lrs(tiny, ReduceLROnPlateau(patience=2, factor=5))
    ours, recorded = one_cycle_lrs(tiny, PlateauLR(patience=2, factor=0.2))
    assert ref.shape == (4 * NB, 3)  # 3 layer groups
    np.testing.assert_allclose(fastai_lrs, ref)  # the defect: the scheduler undoes fastai's reduction
    # epoch 0 best, 1 and 2 no better -> reduced after epoch 2: epoch 3 runs at 0.2 x the schedule
    np.testing.assert_allclose(ours[: 3 * NB], ref[: 3 * NB])
    np.testing.assert_allclose(ours[3 * NB:], 0.2 * ref[3 * NB:])
    np.testing.assert_allclose(recorded, ours[:, -1])  # Recorder sees the LR really used


def test_plateau_min_lr_never_raises_the_schedule(tiny):
    ref, _ = one_cycle_lrs(tiny)
    ours, _ = one_cycle_lrs(tiny, PlateauLR(patience=1, factor=0.2, min_lr=1.0))
    np.testing.assert_allclose(ours, ref)  # floor above the schedule: schedule kept as is


@pytest.mark.parametrize("fit", ["fit", "one_cycle"])
def test_plateau_with_optimwrapper_fastai_does_nothing(tiny, fit):
    opt_func = partial(OptimWrapper, opt=torch.optim.SGD)

    def run(*cbs):
        learn, probe = tiny(opt_func=opt_func), ProbeLR()
        cbs = [FeedMonitor(FLAT), probe, *cbs]
        learn.fit(4, 1e-2, cbs=cbs) if fit == "fit" else learn.fit_one_cycle(4, 1e-2, cbs=cbs)
        return np.array(probe.lrs)  # read from the inner torch optimizer's param_groups

    ref, fastai_lrs = run(), run(ReduceLROnPlateau(patience=2, factor=5))
    ours = run(PlateauLR(patience=2, factor=0.2))
    np.testing.assert_allclose(fastai_lrs, ref)  # fastai #4046: writes to a copy of the hypers
    np.testing.assert_allclose(ours[: 3 * NB], ref[: 3 * NB])
    np.testing.assert_allclose(ours[3 * NB:], 0.2 * ref[3 * NB:])


@pytest.mark.parametrize("opt", [None, "lookahead-radam"])
def test_plateau_scales_fastlesson_sgdr(tiny, opt):
    from fastlesson.optim import opt_func
    from fastlesson.schedule import fit_sgdr, sgdr_lrs

    learn, probe = tiny() if opt is None else tiny(opt_func=opt_func(opt)), ProbeLR()
    cb = PlateauLR(patience=2, factor=0.2)
    fit_sgdr(learn, n_cycles=2, cycle_len=2, cycle_mult=1, lr_max=1e-2, cbs=[FeedMonitor(FLAT), probe, cb])
    ref = sgdr_lrs(2, 2, NB, lr_max=1e-2, cycle_mult=1)  # the schedule's own per-batch LRs
    lrs = np.array(probe.lrs)[:, -1]  # Lookahead: read from the torch param_groups it shares
    np.testing.assert_allclose(lrs[: 3 * NB], ref[: 3 * NB])
    np.testing.assert_allclose(lrs[3 * NB:], 0.2 * ref[3 * NB:])


def test_plateau_constant_lr_does_not_compound(tiny):
    learn, probe, cb = tiny(), ProbeLR(), PlateauLR(patience=1, factor=0.5)
    learn.fit(5, 1e-2, cbs=[FeedMonitor(FLAT), probe, cb])
    per_epoch = np.array(probe.lrs)[:, -1].reshape(5, NB)
    expected = 1e-2 * np.array([1, 1, 0.5, 0.25, 0.125])  # reduced after epochs 1, 2, 3 (patience 1)
    np.testing.assert_allclose(per_epoch, np.repeat(expected[:, None], NB, axis=1))
    assert cb.reductions == [(1, 0.5), (2, 0.25), (3, 0.125), (4, 0.0625)]
    assert learn.opt.hypers[-1]["lr"] == pytest.approx(1e-2)  # unscaled value restored after each step


def test_plateau_cooldown_and_min_lr(tiny):
    learn, probe = tiny(), ProbeLR()
    cb = PlateauLR(patience=1, factor=0.5, cooldown=1, min_lr=3e-3)
    learn.fit(5, 1e-2, cbs=[FeedMonitor(FLAT), probe, cb])
    per_epoch = np.array(probe.lrs)[::NB, -1]
    assert [e for e, _ in cb.reductions] == [1, 3]  # epoch 2 is cooldown: it does not count
    np.testing.assert_allclose(per_epoch, [1e-2, 1e-2, 5e-3, 5e-3, 3e-3])  # 2.5e-3 floored at min_lr


def test_plateau_bad_monitor_names_choices(tiny):
    learn = tiny()
    with pytest.raises(ValueError, match="accuracy"):
        learn.fit(1, cbs=PlateauLR(monitor="acc"))
    with pytest.raises(ValueError, match="factor"):
        PlateauLR(factor=5)


@pytest.mark.parametrize("kw, match", [
    (dict(factor=0), "factor=0"), (dict(factor=1), "factor=1"), (dict(patience=0), "patience=0"),
    (dict(cooldown=-1), "cooldown=-1"), (dict(min_lr=-1e-3), "min_lr"), (dict(min_lr=[0.0, -1e-3]), "min_lr"),
])
def test_plateau_bad_arguments_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        PlateauLR(**kw)


def test_plateau_patience_counts_again_from_zero_after_a_reduction(tiny):
    cb = PlateauLR(patience=2, factor=0.5)
    tiny().fit(7, 1e-2, cbs=[FeedMonitor(FLAT), cb])
    assert [e for e, _ in cb.reductions] == [2, 4, 6]


def test_plateau_any_improvement_counts_by_default(tiny):
    slowly_better = [1.0 - 1e-3 * i for i in range(6)]
    cb = PlateauLR(patience=1)
    tiny().fit(6, 1e-2, cbs=[FeedMonitor(slowly_better), cb])
    assert cb.reductions == []
    cb = PlateauLR(patience=1, min_delta=0.01)  # the same curve is a plateau at a coarser min_delta
    tiny().fit(3, 1e-2, cbs=[FeedMonitor(slowly_better), cb])
    assert [e for e, _ in cb.reductions] == [1, 2]


# ---------- BestWeights ----------

class FeedEarly(FeedMonitor):
    """FeedMonitor ordered before BestWeights (52), after Recorder (50)."""
    order = 51


def test_best_weights_offer_keeps_only_a_finite_strict_improvement():
    model = nn.Linear(2, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    bw = BestWeights(model, 1.0)  # the starting weights are the candidate to beat, at loss 1.0
    assert (bw.best, bw.best_epoch, bw.losses) == (1.0, 0, [])
    with torch.no_grad():
        model.weight.add_(1.0)
    for loss in (1.0, 2.0, math.nan, math.inf, -math.inf):  # equal, worse, non-finite: refused
        assert bw.offer(loss, model, 1) is False
    assert (bw.best, bw.best_epoch) == (1.0, 0)
    assert bw.restore(model) is True and same_state(model.state_dict(), start)  # a copy, made at init
    with torch.no_grad():
        model.weight.add_(2.0)
    later = {k: v.clone() for k, v in model.state_dict().items()}
    assert bw.offer(0.5, model, 3) is True and (bw.best, bw.best_epoch) == (0.5, 3)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert bw.restore(model) is True and same_state(model.state_dict(), later)
    empty = BestWeights()
    assert empty.best == math.inf and empty.restore(model) is False
    assert empty.offer(7.0, model, 1) is True  # anything finite beats inf


def test_best_weights_callback_numbers_epochs_across_fits(tiny):
    learn, snaps = tiny(), SnapEpochs()
    best = BestWeights(learn.model, 2.5)
    learn.fit(3, 1e-2, cbs=[FeedEarly([3.0, 2.0, math.inf]), best])
    assert best.losses[:2] == [3.0, 2.0] and math.isnan(best.losses[2])  # a non-finite loss is listed as NaN
    assert (best.best, best.best_epoch) == (2.0, 2)  # 1-based: the second epoch
    best.offset = 3  # epochs before the next fit
    learn.fit(3, 1e-2, cbs=[FeedEarly([1.5, 1.0, 1.2]), snaps, best])
    assert (best.best, best.best_epoch, len(best.losses)) == (1.0, 5, 6)
    assert best.restore(learn.model) and same_state(current_state(learn), snaps.snaps[1])


def test_best_weights_skips_epochs_that_were_not_validated(tiny):
    from fastlesson.schedule import ValidateAtFitEnd

    learn, best = tiny(), BestWeights()
    learn.fit(2, 1e-2, cbs=[ValidateAtFitEnd(), best])
    assert len(best.losses) == 1 and best.best_epoch == 2  # epoch 1 has no valid_loss: not a candidate
    assert best.best == pytest.approx(learn.recorder.values[-1][1])


# ---------- EarlyStopping ----------

SEQ = [3.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # best at epoch 1, then no improvement


def test_early_stopping_restores_best_fastai_does_not(tiny):
    learn, snaps = tiny(), SnapEpochs()
    es = EarlyStopping(patience=3)
    learn.fit(8, 1e-2, cbs=[FeedMonitor(SEQ), snaps, es])
    assert len(learn.recorder.values) == 5 and es.stopped_epoch == 4 and es.best_epoch == 1
    assert same_state(current_state(learn), snaps.snaps[1])  # the best epoch's weights came back
    assert not same_state(snaps.snaps[1], snaps.snaps[4])

    learn, snaps = tiny(), SnapEpochs()
    learn.fit(8, 1e-2, cbs=[FeedMonitor(SEQ), snaps, EarlyStoppingCallback(patience=3)])
    assert len(learn.recorder.values) == 5
    assert same_state(current_state(learn), snaps.snaps[4])  # fastai: the last epoch's weights
    assert not same_state(current_state(learn), snaps.snaps[1])


def test_early_stopping_defaults_patience_3_and_any_improvement_counts(tiny):
    learn, es = tiny(), EarlyStopping()
    learn.fit(8, 1e-2, cbs=[FeedMonitor([3.0, 2.9, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]), es])
    assert (es.best_epoch, es.stopped_epoch, len(learn.recorder.values)) == (2, 5, 6)


@pytest.mark.parametrize("kw, feed, best_epoch, stopped_epoch", [
    (dict(monitor="accuracy", comp=np.less), [0.5, 0.4, 0.6, 0.7], 1, 3),  # an error-like metric: lower is better
    (dict(min_delta=0.5), [3.0, 2.8, 2.9, 1.0], 0, 2),  # 2.8 is not 0.5 better than 3.0
    (dict(patience=1), [1.0, 2.0, 0.5, 0.4], 0, 1),  # the smallest patience: the first epoch without a gain
])
def test_early_stopping_monitor_comp_min_delta_and_patience(tiny, kw, feed, best_epoch, stopped_epoch):
    learn, es = tiny(), EarlyStopping(**{"patience": 2, **kw})
    learn.fit(len(feed), 1e-2, cbs=[FeedMonitor(feed, monitor=kw.get("monitor", "valid_loss")), es])
    assert (es.best_epoch, es.stopped_epoch) == (best_epoch, stopped_epoch)


def test_early_stopping_second_fit_starts_afresh_unless_reset_on_fit_is_false(tiny):
    learn, es = tiny(), EarlyStopping(patience=2)
    learn.fit(2, 1e-2, cbs=[FeedMonitor([1.0, 0.5]), es])
    learn.fit(3, 1e-2, cbs=[FeedMonitor([2.0, 3.0, 4.0]), es])
    assert (es.best_epoch, es.stopped_epoch) == (0, 2)  # 2.0 is the new fit's first best
    learn, es, snaps = tiny(), EarlyStopping(patience=2, reset_on_fit=False), SnapEpochs()
    learn.fit(2, 1e-2, cbs=[FeedMonitor([1.0, 0.5]), snaps, es])
    first_best = snaps.snaps[1]
    learn.fit(3, 1e-2, cbs=[FeedMonitor([2.0, 3.0, 4.0]), es])
    assert (es.best_epoch, es.stopped_epoch) == (1, 1)  # 0.5 of the first fit still stands: 2 epochs worse
    assert same_state(current_state(learn), first_best)


def test_early_stopping_bad_patience_names_it():
    with pytest.raises(ValueError, match="patience=0"):
        EarlyStopping(patience=0)


def test_early_stopping_without_restore_keeps_last(tiny):
    learn, snaps = tiny(), SnapEpochs()
    learn.fit(8, 1e-2, cbs=[FeedMonitor(SEQ), snaps, EarlyStopping(patience=2, restore_best_weights=False)])
    assert len(learn.recorder.values) == 4
    assert same_state(current_state(learn), snaps.snaps[-1])


# ---------- BestCheckpoint ----------

class FileBytes(Callback):
    """Read the checkpoint file after each epoch (after BestCheckpoint has run)."""
    order = 90

    def __init__(self, path):
        self.path, self.seen = Path(path), []

    def after_epoch(self):
        self.seen.append(self.path.read_bytes() if self.path.exists() else None)


def test_best_checkpoint_never_overwrites_best_with_worse_or_nan(tiny, tmp_path):
    path = tmp_path / "ckpt" / "best.pth"
    learn, snaps, seen = tiny(), SnapEpochs(), FileBytes(path)
    cb = BestCheckpoint(path)
    learn.fit(4, 1e-2, cbs=[FeedMonitor([2.0, 1.0, 1.5, float("nan")]), snaps, cb, seen])
    assert seen.seen[0] != seen.seen[1]  # improvement -> saved
    assert seen.seen[1] == seen.seen[2] == seen.seen[3]  # worse, then NaN: file bytes unchanged
    best = torch.load(path, weights_only=True)
    assert same_state(best, snaps.snaps[1]) and cb.best_epoch == 1
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_best_checkpoint_skips_nonfinite_weights(tiny, tmp_path):
    class Poison(Callback):
        order = 55  # after the epoch's training, before BestCheckpoint looks

        def after_epoch(self):
            if self.epoch == 2:
                with torch.no_grad():
                    next(self.learn.model.parameters()).fill_(float("nan"))

    path = tmp_path / "best.pth"
    learn, seen = tiny(), FileBytes(path)
    cb = BestCheckpoint(path)
    with pytest.warns(UserWarning, match="non-finite"):
        learn.fit(3, 1e-2, cbs=[FeedMonitor([3.0, 2.0, 1.0]), Poison(), cb, seen])
    assert seen.seen[2] == seen.seen[1] and cb.best_epoch == 1 and cb.best == 2.0
    assert _finite(torch.load(path, weights_only=True))


def _finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def crashing_save(obj, f, *args, **kwargs):
    """Simulate a crash half-way through torch.save: some bytes written, then an error."""
    fh = open(f, "wb") if isinstance(f, (str, Path)) else f
    fh.write(b"partial")
    fh.flush()
    raise OSError("simulated crash while saving")


def test_best_checkpoint_crash_while_saving_keeps_previous(tiny, tmp_path, monkeypatch):
    path = tmp_path / "best.pth"
    learn, cb = tiny(), BestCheckpoint(path)
    learn.fit(1, 1e-2, cbs=[FeedMonitor([2.0]), cb])
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        learn.fit(1, 1e-2, cbs=[FeedMonitor([1.0]), cb])  # better value -> tries to save -> crash
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    assert len(torch.load(path, weights_only=True)) > 0


def test_fastai_save_model_crash_corrupts_best(tiny, tmp_path, monkeypatch):
    # the plain-fastai defect BestCheckpoint fixes: SaveModelCallback writes the target file in place
    learn = tiny(path=tmp_path)
    learn.fit(1, 1e-2, cbs=[FeedMonitor([2.0]), SaveModelCallback(fname="best", reset_on_fit=False)])
    target = tmp_path / "models" / "best.pth"
    before = target.read_bytes()
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        learn.fit(1, 1e-2, cbs=[FeedMonitor([1.0]), SaveModelCallback(fname="best")])
    assert target.read_bytes() != before  # the previous best is gone


def test_best_checkpoint_relative_name_and_load_best(tiny, tmp_path):
    learn, snaps = tiny(path=tmp_path), SnapEpochs()
    cb = BestCheckpoint("stage1", load_best=True)
    learn.fit(3, 1e-2, cbs=[FeedMonitor([2.0, 1.0, 3.0]), snaps, cb])
    assert cb.saved_path == tmp_path / "models" / "stage1.pth"
    assert same_state(current_state(learn), snaps.snaps[1])


# ---------- NonFiniteGuard ----------

class InjectNaN(Callback):
    """Make batch 1 of epoch 1 produce a NaN loss, and keep the weights from just before it."""
    order = -20

    def before_batch(self):
        if self.training and self.epoch == 1 and self.iter == 1:
            self.before = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}
            self.learn.xb = (self.learn.xb[0] * float("nan"),)


def test_guard_stops_before_step_fastai_after(tiny):
    learn, inj = tiny(), InjectNaN()
    learn.fit(3, 1e-2, cbs=[inj, TerminateOnNaNCallback()])
    assert not _finite(current_state(learn))  # fastai: the NaN step already happened

    learn, inj, guard = tiny(), InjectNaN(), NonFiniteGuard()
    with pytest.warns(UserWarning, match="non-finite loss"):
        learn.fit(3, 1e-2, cbs=[inj, guard])
    assert _finite(current_state(learn))
    assert same_state(current_state(learn), inj.before)  # params and BatchNorm stats as before the batch
    assert guard.stop_reason == "non-finite loss at epoch 1, batch 1"
    assert len(learn.recorder.values) == 1  # stopped inside epoch 1


def test_guard_reason_is_empty_until_it_stops_and_cleared_by_the_next_fit(tiny):
    guard = NonFiniteGuard()
    assert guard.stop_reason == ""
    with pytest.warns(UserWarning, match="non-finite loss"):
        tiny().fit(2, 1e-2, cbs=[InjectNaN(), guard])
    assert guard.stop_reason.startswith("non-finite loss")
    tiny().fit(1, 1e-2, cbs=[guard])
    assert guard.stop_reason == ""  # a fit that went well says so, also after a stopped one


def test_guard_catches_nonfinite_gradient_with_finite_loss(tiny):
    class NaNGradLoss(nn.Module):
        """Finite loss; on the 3rd training batch adds sqrt(|0|), whose gradient is NaN."""
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, pred, y):
            self.calls += pred.requires_grad  # count training batches only
            loss = F.cross_entropy(pred, y)
            return loss + torch.sqrt((pred - pred.detach()).abs()).sum() if self.calls == 3 else loss

    learn = tiny()
    learn.loss_func = NaNGradLoss()
    before = current_state(learn)

    class Keep(Callback):
        def before_batch(self):
            before.update(current_state(self.learn))

    guard = NonFiniteGuard()
    with pytest.warns(UserWarning, match="non-finite gradient"):
        learn.fit(2, 1e-2, cbs=[Keep(), guard])
    assert guard.stop_reason.startswith("non-finite gradient") and _finite(current_state(learn))
    assert same_state(current_state(learn), before)


class _SeenSizes(Callback):
    """Records the input side of every batch the model gets, training and validation apart."""

    order = ProgressiveResize.order + 1

    def __init__(self):
        self.train, self.valid = [], []

    def before_batch(self):
        (self.train if self.training else self.valid).append(tuple(self.learn.xb[0].shape[-2:]))


def test_progressive_resize_shrinks_training_batches_only_while_active(tiny):
    learn = tiny()  # 8 px synthetic images
    on = [True, False]  # asked once per training pass: epoch 1 small, epoch 2 full size
    cb, seen = ProgressiveResize(4, active=lambda: on.pop(0)), _SeenSizes()
    learn.fit(2, 1e-3, cbs=[cb, seen])
    assert seen.train == [(4, 4)] * NB + [(8, 8)] * NB  # each pass at the size asked for
    assert set(seen.valid) == {(8, 8)}  # validation always at the data's size
    assert cb.small == [True, False]


def test_progressive_resize_is_an_antialiased_resize_of_the_augmented_batch():
    cb = ProgressiveResize(4)
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    cb.learn = SimpleNamespace(xb=(x,), training=True)
    cb.before_train()
    cb.before_batch()
    out = cb.learn.xb[0]
    expect = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(out, expect) and out.is_contiguous(memory_format=torch.channels_last)
    # a batch already at the size (validation-sized data, or the full-size cycle) is left as it is
    cb.learn = SimpleNamespace(xb=(out,), training=True)
    cb.before_batch()
    assert cb.learn.xb[0] is out


@pytest.mark.parametrize("size", [0, 1, 12.5, True, "128"])
def test_progressive_resize_bad_size(size):
    with pytest.raises(ValueError, match=r"size=.* must be an image side in pixels \(int >= 2\), e.g. 128"):
        ProgressiveResize(size)


def test_average_states_is_the_mean_of_float_tensors_and_the_last_integer_buffers():
    from fastlesson.callbacks import average_states

    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor(7)}
    avg = average_states([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and avg["h"].dtype == torch.float16
    assert float(avg["h"]) == 1.5 and int(avg["n"]) == 7 and avg["n"].dtype == torch.int64
    assert torch.equal(average_states([a])["w"], a["w"])
    assert torch.equal(average_states([a, dict(reversed(b.items()))])["w"], avg["w"])  # key order is free
    with pytest.raises(ValueError, match="at least one"):
        average_states([])
    with pytest.raises(ValueError, match="different keys"):
        average_states([a, {"w": a["w"]}])
