"""Schedules: checked one-cycle, SGDR vs torch's CosineAnnealingWarmRestarts, discriminative LRs, freezing."""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import combined_cos
from fastai.optimizer import Optimizer, OptimWrapper, sgd_step
from fastai.torch_core import params
from matplotlib.figure import Figure

from fastlesson.schedule import (
    SCHEDULE_KINDS,
    ValidateAtFitEnd,
    fit_one_cycle,
    fit_sgdr,
    fit_until_overfit,
    freeze,
    freeze_to,
    lr_groups,
    n_groups,
    plot_schedules,
    resolve_lrs,
    schedule_preview,
    sgdr_cycle_lengths,
    sgdr_epochs,
    sgdr_lrs,
    unfreeze,
)


def quiet(fn, learn, *args, **kw):
    """Run a fit function on `learn` without progress bars or printed tables."""
    with learn.no_bar(), learn.no_logging():
        return fn(learn, *args, **kw)


class HyperLog(Callback):
    """Records every group's hyperparameters after the schedulers (order 60) set them."""
    order, run_valid = 61, False

    def before_fit(self):
        self.lrs, self.mom_log = [], []

    def before_batch(self):
        self.lrs.append([h["lr"] for h in self.opt.hypers])
        self.mom_log.append([h.get("mom") for h in self.opt.hypers])


class HalveLR(Callback):
    """Stands in for a plateau scaler: acts on the LR after the scheduler in the same before_batch."""
    order, run_valid = 61, False

    def before_batch(self):
        self.opt.set_hyper("lr", [h["lr"] / 2 for h in self.opt.hypers])


def torch_cawr_lrs(n_steps, base_lr, t_0, t_mult, eta_min):
    """Reference: torch's CosineAnnealingWarmRestarts stepped once per batch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult, eta_min=eta_min)
    out = []
    for _ in range(n_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


adagrad = partial(OptimWrapper, opt=torch.optim.Adagrad)


def lr_only_sgd(ps, lr):
    """A fastai Optimizer with an LR and no momentum hyperparameter (plain SGD steps)."""
    return Optimizer(ps, [sgd_step], lr=lr)


class LrOnlyFactory:
    """An opt_func without a __name__ (a callable object): errors name the optimizer's class instead."""

    def __call__(self, ps, lr):
        return lr_only_sgd(ps, lr)


@pytest.fixture
def learner(tiny_learner):
    """tiny_learner with one small validation batch and no DataLoader worker processes (x3 faster here)."""
    def make(**kw):
        learn = tiny_learner(**{"n_valid": 8, **kw})
        for dl in learn.dls:
            dl.fake_l.num_workers = 0
        return learn
    return make


# ----------------------------------------------------------------------------- layer groups, resolve_lrs

def test_n_groups(learner):
    assert n_groups(learner()) == 3
    assert n_groups(learner(splitter=False)) == 1


def test_resolve_lrs_matches_fastai_semantics(learner):
    learn = learner(lr=3e-3)
    np.testing.assert_array_equal(resolve_lrs(learn, None), [3e-3] * 3)  # learn.lr, like fastai
    np.testing.assert_array_equal(resolve_lrs(learn, 1e-2), [1e-2] * 3)
    np.testing.assert_array_equal(resolve_lrs(learn, [1e-4, 1e-3, 1e-2]), [1e-4, 1e-3, 1e-2])
    for lr in (slice(1e-2), slice(1e-4, 1e-2)):
        learn.opt.set_hyper("lr", lr)
        fastai_lrs = [h["lr"] for h in learn.opt.hypers]
        np.testing.assert_allclose(resolve_lrs(learn, lr), fastai_lrs, rtol=1e-12)
    np.testing.assert_array_equal(resolve_lrs(learn, slice(1e-2)), [1e-3, 1e-3, 1e-2])
    lrs = resolve_lrs(learn, slice(1e-4, 1e-2))
    assert lrs[0] == 1e-4 and lrs[-1] == 1e-2  # exact ends
    np.testing.assert_allclose(lrs[1], 1e-3)


def test_slice_on_one_group_model_raises_where_fastai_drops_lo(learner):
    learn = learner(splitter=False)
    learn.create_opt()
    learn.opt.set_hyper("lr", slice(1e-5, 1e-2))
    assert [h["lr"] for h in learn.opt.hypers] == [1e-2]  # fastai: lo silently gone
    with pytest.raises(ValueError, match="only 1 layer group.*splitter"):
        resolve_lrs(learn, slice(1e-5, 1e-2))
    with pytest.raises(ValueError, match="1 layer group"):
        fit_one_cycle(learn, 1, slice(1e-5, 1e-2))
    np.testing.assert_array_equal(resolve_lrs(learn, slice(1e-2)), [1e-2])  # nothing dropped: fine


@pytest.mark.parametrize("lr_max", [0, -1e-3, [1e-3, 1e-2], float("nan"), slice(None), slice(-1, 1)])
def test_resolve_lrs_bad_values(learner, lr_max):
    with pytest.raises(ValueError, match="lr_max"):
        resolve_lrs(learner(), lr_max)


def test_lr_groups(learner):
    np.testing.assert_allclose(lr_groups(learner(), 9e-3), [1e-3, 3e-3, 9e-3])
    np.testing.assert_allclose(lr_groups(learner(), 1e-2, factor=10), [1e-4, 1e-3, 1e-2])
    assert lr_groups(learner(splitter=False), 1e-2).tolist() == [1e-2]
    assert lr_groups(learner(), 1e-2, factor=1).tolist() == [1e-2] * 3  # factor=1 (the bound): equal LRs


@pytest.mark.parametrize("kw, name", [({"factor": 0.5}, "factor"), ({"factor": 0}, "factor"),
                                      ({"lr_max": 0}, "lr_max"), ({"lr_max": -1.0}, "lr_max")])
def test_lr_groups_bad_args(learner, kw, name):
    kw = {"lr_max": 1e-2, **kw}
    with pytest.raises(ValueError, match=f"{name}="):  # names the argument and its value
        lr_groups(learner(), **kw)


# ----------------------------------------------------------------------------- freeze / unfreeze

def test_freeze_unfreeze_count_groups_and_keep_batchnorm_trainable(learner, capsys):
    learn = learner()
    assert freeze(learn) == 1
    assert "1 of 3 layer groups trainable" in capsys.readouterr().out
    early = learn.model[0][0]
    assert not early[0].weight.requires_grad  # conv in a frozen group
    assert early[1].weight.requires_grad  # BatchNorm stays trainable (fastai's train_bn)
    assert all(p.requires_grad for p in learn.model[1].parameters())
    assert unfreeze(learn) == 3
    assert "3 of 3 layer groups trainable" in capsys.readouterr().out
    assert all(p.requires_grad for p in learn.model.parameters())


def test_freeze_to_trains_the_later_groups_and_checks_its_index(learner, capsys):
    learn = learner()
    assert freeze_to(learn, 1) == 2
    assert "2 of 3 layer groups trainable" in capsys.readouterr().out
    early = learn.model[0][0]
    assert not early[0].weight.requires_grad and early[1].weight.requires_grad  # train_bn, as fastai
    assert freeze_to(learn, -1, verbose=False) == 1 and freeze_to(learn, 0, verbose=False) == 3
    assert freeze_to(learn, -3, verbose=False) == 3  # -total is a valid index (the first group), like 0
    for n in (3, -4, 1.0, True):
        with pytest.raises(ValueError, match=r"freeze_to n=.*\[-3, 2\]"):
            freeze_to(learn, n)


def test_freeze_and_unfreeze_work_on_a_two_group_model(learner):
    learn = learner(splitter=False)
    learn.splitter = lambda m: [params(m[0]), params(m[1])]  # body, head: the fewest groups allowed
    assert freeze(learn, verbose=False) == 1
    assert not learn.model[0][0][0].weight.requires_grad and learn.model[1][2].weight.requires_grad
    assert unfreeze(learn, verbose=False) == 2 and freeze_to(learn, 1, verbose=False) == 1


def test_freeze_refuses_one_group_model_where_fastai_trains_everything(learner):
    learn = learner(splitter=False)
    learn.freeze()  # fastai: no error, nothing frozen
    conv = learn.model[0][0][0].weight
    before = conv.detach().clone()
    quiet(lambda lrn: lrn.fit(1, 1e-2), learn)
    assert not torch.equal(before, conv.detach())  # the "frozen" body trained
    for fn in (freeze, unfreeze, lambda lrn: freeze_to(lrn, 0)):
        with pytest.raises(ValueError, match="1 layer group.*splitter"):
            fn(learn)


# ----------------------------------------------------------------------------- fit_one_cycle

def test_fit_one_cycle_same_lrs_as_fastai(learner):
    ours, theirs = learner(), learner()
    quiet(fit_one_cycle, ours, 2, slice(1e-3, 1e-2))
    quiet(lambda lrn: lrn.fit_one_cycle(2, slice(1e-3, 1e-2)), theirs)
    np.testing.assert_allclose(ours.recorder.lrs, theirs.recorder.lrs, rtol=1e-9)
    np.testing.assert_allclose(ours.recorder.hps["mom"], theirs.recorder.hps["mom"])


def test_fit_one_cycle_adagrad_clear_error_where_fastai_keyerrors(learner):
    with pytest.raises(KeyError, match="mom"):  # fastai: deep inside training
        quiet(lambda lrn: lrn.fit_one_cycle(1, 1e-2), learner(opt_func=adagrad))
    learn = learner(opt_func=adagrad)
    w = learn.model[1][2].weight.detach().clone()
    with pytest.raises(ValueError, match=r"Adagrad.*'mom'.*moms=None"):
        fit_one_cycle(learn, 1, 1e-2)
    assert torch.equal(w, learn.model[1][2].weight)  # refused before any step


@pytest.mark.parametrize("opt_func, name", [(lr_only_sgd, "lr_only_sgd"), (partial(lr_only_sgd), "lr_only_sgd"),
                                           (LrOnlyFactory(), "Optimizer")])
def test_fit_one_cycle_error_names_an_optimizer_without_mom(learner, opt_func, name):
    """A fastai Optimizer is named by its opt_func (unwrapping a partial), else by its class."""
    with pytest.raises(ValueError, match=rf"\b{name}\b.*\['mom'\]"):
        fit_one_cycle(learner(opt_func=opt_func), 1, 1e-2)


def test_fit_one_cycle_keeps_the_optimizer_and_its_state_by_default(learner):
    learn = learner(n_train=16)
    learn.create_opt()
    opt = learn.opt
    quiet(fit_one_cycle, learn, 1, 1e-2)
    assert learn.opt is opt  # fastai's default reset_opt=False: momentum state carries into the next fit
    quiet(fit_one_cycle, learn, 1, 1e-2, reset_opt=True)
    assert learn.opt is not opt


def test_fit_one_cycle_moms_none_schedules_lr_only(learner):
    learn = learner(opt_func=adagrad)
    quiet(fit_one_cycle, learn, 2, 1e-2, moms=None)
    lrs = np.array(learn.recorder.lrs)
    n = len(lrs)  # 4 batches/epoch x 2 epochs
    f = combined_cos(0.25, 1e-2 / 25, 1e-2, 1e-2 / 1e5)
    np.testing.assert_allclose(lrs, [f(i / n) for i in range(n)], rtol=1e-6)
    assert lrs[0] == pytest.approx(4e-4) and lrs.max() == pytest.approx(1e-2, rel=0.05)


# ----------------------------------------------------------------------------- SGDR

def test_cycle_lengths_and_epochs():
    assert sgdr_cycle_lengths(3, 1, 2) == [1, 2, 4]
    assert sgdr_cycle_lengths(3, 2, 1) == [2, 2, 2]
    assert sgdr_cycle_lengths(4, 1, 1.5) == [1, 2, 2, 3]  # 1, 1.5, 2.25, 3.375 rounded half-up
    assert sgdr_epochs(3, 1, 2) == 7
    assert sgdr_epochs(4, 1, 1) == 4


def test_fastai_sgdr_divides_by_zero_for_cycle_mult_1_ours_works(learner):
    with pytest.raises(ZeroDivisionError):
        quiet(lambda lrn: lrn.fit_sgdr(2, 1, 1e-2, cycle_mult=1), learner(n_train=16))
    learn = learner(n_train=32)  # 2 batches per epoch
    assert quiet(fit_sgdr, learn, 3, 1, 1e-2, cycle_mult=1) == [0, 1, 2]
    np.testing.assert_allclose(learn.recorder.lrs, [1e-2, 5e-3] * 3)


def test_every_restart_is_exactly_lr_max_where_fastai_gives_1e16(learner):
    theirs, ours = learner(n_train=16), learner(n_train=16)  # 1 batch/epoch; cycles 1, 2, 4
    quiet(lambda lrn: lrn.fit_sgdr(3, 1, 1e-2, cycle_mult=2), theirs)
    assert theirs.recorder.lrs[3] < 1e-12  # fastai: the third cycle's first batch at ~1e-16, not 1e-2
    assert quiet(fit_sgdr, ours, 3, 1, 1e-2, cycle_mult=2) == [0, 2, 6]
    assert [ours.recorder.lrs[i] for i in (0, 1, 3)] == [1e-2] * 3


@pytest.mark.parametrize("cycle_mult, n_cycles", [(1, 3), (2, 3), (3, 2)])
def test_fit_sgdr_equals_torch_cosine_annealing_warm_restarts(learner, cycle_mult, n_cycles):
    learn = learner(n_train=32)  # 2 batches per epoch
    quiet(fit_sgdr, learn, n_cycles, 1, 1e-2, cycle_mult=cycle_mult, lr_min=1e-4)
    lrs = np.array(learn.recorder.lrs)
    assert len(lrs) == sgdr_epochs(n_cycles, 1, cycle_mult) * 2
    ref = torch_cawr_lrs(len(lrs), 1e-2, t_0=2, t_mult=cycle_mult, eta_min=1e-4)
    np.testing.assert_allclose(lrs, ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sgdr_lrs(n_cycles, 1, 2, 1e-2, cycle_mult, lr_min=1e-4), ref, rtol=1e-12)


def test_fit_sgdr_keeps_group_ratios_and_momentum(learner):
    log = HyperLog()
    learn = learner(n_train=32)
    quiet(fit_sgdr, learn, 2, 1, slice(1e-4, 1e-2), lr_min=1e-5, cbs=log)
    lrs = np.array(log.lrs)  # (batches, groups)
    np.testing.assert_allclose(lrs / lrs[:, -1:], np.tile([1e-2, 1e-1, 1.0], (len(lrs), 1)), rtol=1e-12)
    np.testing.assert_allclose(lrs[:, -1], sgdr_lrs(2, 1, 2, 1e-2, lr_min=1e-5), rtol=1e-12)
    assert lrs[:, -1].min() > 1e-5 and lrs[:, 0].min() > 1e-7  # floors scaled per group
    assert {m for row in log.mom_log for m in row} == {learn.opt.hypers[0]["mom"]}  # momentum never moved


def test_fit_sgdr_floor_from_lr_min_div_is_lr_max_over_it(learner):
    learn = learner(n_train=32)
    quiet(fit_sgdr, learn, 2, 1, 1e-2, lr_min_div=100)
    np.testing.assert_allclose(learn.recorder.lrs, sgdr_lrs(2, 1, 2, 1e-2, lr_min=1e-4), rtol=1e-12)


@pytest.mark.parametrize("moms", [(0.95, 0.85, 0.95), None])  # fastai's path, and the LR-only one
def test_fit_one_cycle_runs_the_callbacks_it_is_given(learner, moms):
    log = HyperLog()
    quiet(fit_one_cycle, learner(), 1, 1e-2, moms=moms, cbs=log)
    assert len(log.lrs) > 0


def test_fit_sgdr_lets_later_callbacks_rescale_lr(learner):
    learn = learner(n_train=32)
    quiet(fit_sgdr, learn, 2, 1, 1e-2, cbs=HalveLR())
    np.testing.assert_allclose(learn.recorder.lrs, sgdr_lrs(2, 1, 2, 1e-2) / 2)


def test_warmup_first_cycle_only():
    lrs = sgdr_lrs(2, 2, 4, lr_max=0.1, cycle_mult=1, warmup=3)  # cycles of 8 batches
    np.testing.assert_allclose(lrs[:4], [0.025, 0.05, 0.075, 0.1])  # linear ramp, then exactly lr_max
    assert lrs[3] == 0.1 and lrs[8] == 0.1  # cosine after warm-up; the second cycle restarts at lr_max
    assert len(lrs) == 16
    np.testing.assert_allclose(lrs[8:], sgdr_lrs(1, 2, 4, lr_max=0.1))  # second cycle has no warm-up
    with pytest.raises(ValueError, match="warmup"):
        sgdr_lrs(2, 1, 4, warmup=4)


def test_fit_sgdr_warmup_and_start_cycle_follow_preview(learner):
    learn = learner(n_train=32)
    quiet(fit_sgdr, learn, 2, 2, 1e-2, warmup=2)
    np.testing.assert_allclose(learn.recorder.lrs, sgdr_lrs(2, 2, 2, 1e-2, warmup=2))
    learn = learner(n_train=32)
    assert quiet(fit_sgdr, learn, 2, 1, 1e-2, start_cycle=1) == [2]  # resumes at epoch 1
    np.testing.assert_allclose(learn.recorder.lrs, sgdr_lrs(2, 1, 2, 1e-2)[2:])


def test_fit_sgdr_snapshots_each_cycle(learner, tmp_path):
    learn = learner(n_train=32)
    quiet(fit_sgdr, learn, 2, 1, 1e-2, snapshot_dir=tmp_path / "snaps")
    files = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert files == ["cycle_0.pth", "cycle_1.pth"]  # no temp files left
    first, last = (torch.load(tmp_path / "snaps" / f, weights_only=True) for f in files)
    for k, v in learn.model.state_dict().items():
        assert torch.equal(last[k], v)
    w = "1.2.weight"  # the head's Linear: trained in cycle 1, so the snapshots differ
    assert not torch.equal(first[w], last[w])


@pytest.mark.parametrize("kw, name", [
    ({"n_cycles": 0}, "n_cycles"), ({"cycle_len": 0}, "cycle_len"), ({"cycle_len": -1}, "cycle_len"),
    ({"cycle_mult": 0.5}, "cycle_mult"), ({"lr_max": 0.0}, "lr_max"), ({"lr_max": -1e-3}, "lr_max"),
    ({"lr_min": 1.0}, "lr_min=1.0 must be in \\[0, 0.01\\]"), ({"warmup": -1}, "warmup"),
    ({"start_cycle": 2}, "start_cycle"), ({"lr_min_div": 0}, "lr_min_div"),
    ({"lr_min_div": 10, "lr_min": 1e-4}, "either lr_min or lr_min_div"),
])
def test_fit_sgdr_bad_args_name_the_argument(learner, kw, name):
    learn = learner()
    w = learn.model[1][2].weight.detach().clone()
    args = {"n_cycles": 2, "cycle_len": 1, "lr_max": 1e-2, **kw}
    with pytest.raises(ValueError, match=name):
        quiet(fit_sgdr, learn, **args)
    assert torch.equal(w, learn.model[1][2].weight)


# ----------------------------------------------------------------------------- previews

def test_schedule_previews_values():
    np.testing.assert_allclose(schedule_preview("step", 9, 1.0, step_size=3, gamma=0.5)[[0, 2, 3, 8]],
                               [1, 1, 0.5, 0.25])
    np.testing.assert_allclose(schedule_preview("exponential", 11, 2.0, k=0.1)[[0, 10]], [2.0, 2 * np.exp(-1)])
    np.testing.assert_allclose(schedule_preview("inverse_time", 11, 1.0, k=0.5)[[0, 2, 10]], [1, 0.5, 1 / 6])
    oc = schedule_preview("one_cycle", 100, 1.0)
    assert oc[0] == pytest.approx(1 / 25) and oc[25] == pytest.approx(1.0) and oc[-1] < 1e-3
    np.testing.assert_allclose(schedule_preview("sgdr", 14, 1.0, cycle_len=2), sgdr_lrs(3, 2, 1, 1.0))
    assert len(schedule_preview("sgdr", 10, 1.0, cycle_len=2)) == 10
    np.testing.assert_array_equal(schedule_preview("constant", 3, 0.1), [0.1] * 3)


def test_schedule_preview_bad_args():
    with pytest.raises(ValueError, match="one_cycle"):  # lists the valid kinds
        schedule_preview("cosine", 10, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        schedule_preview("step", 10, 1.0, k=1)
    with pytest.raises(ValueError, match="n_iter"):
        schedule_preview("step", 0, 1.0)
    with pytest.raises(ValueError, match="lr_max"):
        schedule_preview("step", 10, -1.0)
    assert set(SCHEDULE_KINDS) >= {"step", "exponential", "inverse_time", "one_cycle", "sgdr"}


def test_plot_schedules_saves_png(tmp_path):
    scheds = {k: schedule_preview(k, 50, 0.1) for k in SCHEDULE_KINDS}
    fig = plot_schedules(scheds, path=tmp_path / "out" / "lrs.png")
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == len(SCHEDULE_KINDS)
    assert (tmp_path / "out" / "lrs.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="schedules"):
        plot_schedules({})


# ---------------------------------------------------------------- fit_until_overfit: plans and resuming

def test_validate_at_fit_end_validates_the_last_epoch_only(learner):
    learn = learner(n_train=16)
    quiet(lambda lrn: lrn.fit(3, 1e-3, cbs=ValidateAtFitEnd()), learn)
    # [train_loss] for the skipped epochs, [train_loss, valid_loss, accuracy] for the last
    assert [len(v) for v in learn.recorder.values] == [1, 1, 3]


@pytest.mark.parametrize("revised", [[1, 0], [1, -1], [1, True], [1, 1.5]])
def test_fit_until_overfit_rejects_revised_lengths_that_are_not_whole_epochs(learner, revised):
    with pytest.raises(ValueError, match=re.escape(f"after_cycle returned {revised!r}")):
        quiet(fit_until_overfit, learner(n_train=16), 1e-3, epochs_max=4, baseline=float("inf"),
              cycle_lengths=[1, 1], after_cycle=lambda progress, best: revised)



def test_fit_until_overfit_runs_given_cycle_lengths_and_reports_each_cycle(tiny_learner):
    from fastlesson.schedule import fit_until_overfit

    learn, seen = tiny_learner(n_train=64), []
    stop = fit_until_overfit(learn, 3e-3, epochs_max=4, baseline=float("inf"), cycle_lengths=[1, 3],
                             after_cycle=lambda progress, best: seen.append((progress.cycles, progress.epochs)))
    assert seen[0] == (1, 1) and len(seen) == stop["cycles"]
    if stop["cycles"] == 2:
        assert stop["epochs"] == 4 and "planned cycle(s)" in stop["reason"]
    with pytest.raises(ValueError, match="cycle_lengths"):
        fit_until_overfit(learn, 3e-3, epochs_max=4, cycle_lengths=[1, 0])


def test_fit_until_overfit_follows_lengths_revised_after_a_cycle(tiny_learner):
    from fastlesson.schedule import fit_until_overfit

    learn = tiny_learner(n_train=64)
    seen = []

    def revise(progress, best):
        seen.append(progress.cycles)
        return [1, 1]  # planned [1, 4]: after cycle 1 the plan says one more 1-epoch cycle

    stop = fit_until_overfit(learn, 3e-3, epochs_max=10, baseline=float("inf"), cycle_lengths=[1, 4],
                             after_cycle=revise)
    assert stop["epochs"] == stop["cycles"] and stop["cycles"] <= 2  # never the 4-epoch cycle
    if stop["cycles"] == 2:
        assert "[1, 1]" in stop["reason"] and seen == [1, 2]
    with pytest.raises(ValueError, match=r"keep the 1 trained cycle\(s\) \[2\]"):
        fit_until_overfit(learn, 3e-3, epochs_max=10, baseline=float("inf"), cycle_lengths=[2, 2],
                          after_cycle=lambda progress, best: [1, 1])


def test_fit_until_overfit_resumed_after_a_cycle_equals_one_fit(tiny_learner):
    """Cycle 1, then the saved (progress, best) and weights/optimizer carried into a second call: the
    same weights as cycles 1 and 2 in one call (same batch order)."""
    from fastlesson.callbacks import BestWeights
    from fastlesson.schedule import OverfitProgress, fit_until_overfit

    def make():
        torch.manual_seed(0)
        learn = tiny_learner(n_train=64)
        learn.dls.train.rng.seed(1)
        return learn

    whole = make()
    with whole.no_bar(), whole.no_logging():
        a = fit_until_overfit(whole, 3e-3, epochs_max=3, baseline=float("inf"))
    split = make()
    best, progress = BestWeights(split.model, float("inf")), OverfitProgress()
    with split.no_bar(), split.no_logging():
        fit_until_overfit(split, 3e-3, epochs_max=1, baseline=float("inf"), best=best, progress=progress)
        progress.reason = None  # stopped by epochs_max=1 only: go on as one call would
        if a["cycles"] == 2:  # cycle 2 ran in one call: load the cycle-1 end state and go on
            b = fit_until_overfit(split, 3e-3, epochs_max=3, best=best, progress=progress)
            assert (b["cycles"], b["epochs"], b["best_epoch"]) == (a["cycles"], a["epochs"], a["best_epoch"])
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, split.model.state_dict()[k]), k
