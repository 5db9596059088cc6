"""find_lr: exponential sweep, stops, suggestions, exact restore, groups, plot; vs plain fastai."""

import math
import random
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.schedule import lr_find as _fastai_lr_find  # noqa: F401  (patches Learner)
from fastai.optimizer import OptimWrapper
from matplotlib.figure import Figure
from torch import nn

from fastlesson import LRFinderResult, find_lr
from fastlesson.finder import MIN_POINTS, suggest_lrs


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs are ~30x slower with 2 threads on 2 busy shared cores; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------- helpers ----------

def weights(learn):
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_tree(a, b):
    """Deep equality for optimizer state dicts (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def opt_state(learn):
    import copy
    return copy.deepcopy(learn.opt.state_dict())


def mk(tiny_learner, tmp_path, **kw):
    """The shared tiny learner made smaller still (8px, 16 items): a sweep is ~30 tiny batches."""
    for k, v in {"size": 8, "n_train": 16, "n_valid": 8, "bs": 8}.items():
        kw.setdefault(k, v)
    return tiny_learner(path=tmp_path, **kw)


def trained(tiny_learner, tmp_path, **kw):
    """A learner after one real epoch, so Adam has non-trivial state and the recorder has history."""
    learn = mk(tiny_learner, tmp_path, **kw)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    return learn


class LRLog(Callback):
    """Records every group's LR as the optimizer sees it when the loss is computed."""
    order = 50  # after_loss before find_lr's (60), which may cancel the fit

    def before_fit(self):
        self.lrs = []

    def after_loss(self):
        if self.training:
            self.lrs.append([h["lr"] for h in self.opt.hypers])


class Raise(Callback):
    """Raises `exc` after the optimizer step of batch `at`, i.e. with the weights already changed."""

    def __init__(self, exc, at=5):
        self.exc, self.at, self.n = exc, at, 0

    def after_step(self):
        self.n += 1
        if self.n >= self.at:
            raise self.exc("interrupted mid-sweep")


class LRLoss(nn.Module):
    """Cross-entropy that turns NaN (or grows) with the top group's current LR."""

    def __init__(self, nan_above=None, grow_above=None):
        super().__init__()
        self.nan_above, self.grow_above, self.learn = nan_above, grow_above, None

    def forward(self, pred, y):
        loss = F.cross_entropy(pred, y)
        lr = self.learn.opt.hypers[-1]["lr"]
        if self.nan_above is not None and lr > self.nan_above:
            return loss * float("nan")
        if self.grow_above is not None:
            return loss + (lr / self.grow_above) ** 2  # finite, but blows up past grow_above
        return loss


def lr_loss_learner(tiny_learner, tmp_path, **kw):
    learn = mk(tiny_learner, tmp_path)
    learn.loss_func = LRLoss(**kw)
    learn.loss_func.learn = learn
    return learn


# ---------- the sweep ----------

def test_sweep_is_exponential_applied_and_completes(tiny_learner, tmp_path):
    learn = mk(tiny_learner, tmp_path)
    log = LRLog()
    r = find_lr(learn, start_lr=1e-6, end_lr=1e-3, num_it=25, cbs=[log])
    assert isinstance(r, LRFinderResult) and r.stop_reason == "completed"
    assert len(r.lrs) == len(r.losses) == len(r.smoothed) == 25
    np.testing.assert_allclose(r.lrs, np.geomspace(1e-6, 1e-3, 25), rtol=1e-12)  # ends at end_lr
    np.testing.assert_allclose(np.array(log.lrs)[:, -1], r.lrs, rtol=1e-12)  # what the optimizer used
    assert np.isfinite(r.losses).all() and r.lrs[0] <= r.suggestion <= r.lrs[-1]
    assert set(r.suggestions) == {"valley", "slide", "steep", "minimum"}
    assert r.group_lrs is not None and len(r.group_lrs) == 3


def test_small_dataset_runs_enough_epochs(tiny_learner, tmp_path):
    learn = mk(tiny_learner, tmp_path, n_train=12, bs=8)  # 2 batches per epoch
    assert len(learn.dls.train) == 2
    r = find_lr(learn, end_lr=1e-3, num_it=25)
    assert r.stop_reason == "completed" and len(r.losses) == 25


def test_divergence_stops_early_unless_stop_div_false(tiny_learner, tmp_path):
    learn = lr_loss_learner(tiny_learner, tmp_path, grow_above=1e-2)
    r = find_lr(learn, num_it=40)
    assert r.stop_reason == "diverged" and len(r.losses) < 40
    assert r.smoothed[-1] > 4 * r.smoothed.min()  # fastai's 4x-best rule
    r2 = find_lr(learn, num_it=40, stop_div=False)
    assert r2.stop_reason == "completed" and len(r2.losses) == 40


def test_nan_loss_stops_at_first_nonfinite_and_fastai_trains_on(tiny_learner, tmp_path):
    learn = lr_loss_learner(tiny_learner, tmp_path, nan_above=5e-2)
    before = weights(learn)
    r = find_lr(learn, end_lr=1, num_it=30)
    assert r.stop_reason == "non_finite"
    n_ok = int(np.sum(np.geomspace(1e-7, 1, 30) <= 5e-2))  # batches whose LR keeps the loss finite
    assert len(r.losses) == n_ok and np.isfinite(r.losses).all() and r.lrs.max() <= 5e-2
    after = weights(learn)
    assert same_weights(before, after) and all(torch.isfinite(v.float()).all() for v in after.values())
    # plain fastai: `nan > 4*best` is False, so it keeps stepping on NaN to the last batch
    with learn.no_bar():
        learn.lr_find(end_lr=1, num_it=30, show_plot=False)
    fastai_losses = np.array([float(x) for x in learn.recorder.losses])
    fastai_nan = np.array(learn.recorder.lrs) > 5e-2  # fastai's LRs run one step behind ours
    assert len(fastai_losses) == 30 and fastai_nan.sum() > 1
    assert np.isnan(fastai_losses[fastai_nan]).all()  # every NaN batch was trained on


# ---------- restore ----------

@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupt_restores_weights_opt_and_learner_state(tiny_learner, tmp_path, exc):
    learn = trained(tiny_learner, tmp_path)
    learn.model.eval()
    w, o = weights(learn), opt_state(learn)
    rec_losses, n_cbs, logger = list(learn.recorder.losses), len(learn.cbs), learn.logger
    with pytest.raises(exc):
        find_lr(learn, num_it=50, cbs=[Raise(exc)])
    assert same_weights(w, weights(learn))
    assert same_tree(o, opt_state(learn))
    assert not learn.model.training and not any(m.training for m in learn.model.modules())
    assert learn.recorder.losses == rec_losses and len(learn.cbs) == n_cbs
    assert learn.logger is logger and hasattr(learn, "progress")


def test_torch_optimizer_state_restored_through_optimwrapper(tiny_learner, tmp_path):
    opt_func = partial(OptimWrapper, opt=torch.optim.AdamW)  # how Lookahead/torch optims plug in
    learn = trained(tiny_learner, tmp_path, opt_func=opt_func)
    w, o = weights(learn), opt_state(learn)
    assert o["state"]  # AdamW moments exist
    with pytest.raises(KeyboardInterrupt):
        find_lr(learn, num_it=30, cbs=[Raise(KeyboardInterrupt)])
    assert same_weights(w, weights(learn)) and same_tree(o, opt_state(learn))


def test_later_training_is_exactly_as_without_the_sweep(tiny_learner, tmp_path):
    """Data-loader shuffle RNG and global RNGs (dropout here) are restored with the weights."""
    def fit_one(sweep):
        random.seed(0)  # fastai seeds each DataLoader's own shuffle RNG from `random`
        learn = mk(tiny_learner, tmp_path)  # seeds torch itself
        learn.model[1].append(nn.Dropout(0.5))
        if sweep:
            find_lr(learn, num_it=25, end_lr=1e-3)
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-2)
        return weights(learn)

    assert same_weights(fit_one(sweep=True), fit_one(sweep=False))


def test_plain_fastai_lr_find_leaves_changed_weights_after_interrupt(tiny_learner, tmp_path):
    learn = trained(tiny_learner, tmp_path)
    w = weights(learn)
    learn.add_cb(Raise(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt), learn.no_bar():
        learn.lr_find(num_it=50, show_plot=False)
    assert not same_weights(w, weights(learn))  # fastai restores only in after_fit, never reached


def test_completed_sweep_restores_everything(tiny_learner, tmp_path):
    learn = mk(tiny_learner, tmp_path)
    assert learn.opt is None
    learn.model.train()
    w = weights(learn)
    r = find_lr(learn, num_it=25, end_lr=1e-2)
    assert learn.opt is None  # it had none: a later fit creates a fresh one, as before
    assert same_weights(w, weights(learn)) and learn.model.training
    # with optimizer state and per-group hypers
    learn = trained(tiny_learner, tmp_path)
    learn.opt.set_hyper("lr", [1e-4, 1e-3, 1e-2])
    w, o, rec = weights(learn), opt_state(learn), list(learn.recorder.values)
    r = find_lr(learn, num_it=25, end_lr=1e-2)
    assert len(r.losses) > 0
    assert same_weights(w, weights(learn)) and same_tree(o, opt_state(learn))
    assert [h["lr"] for h in learn.opt.hypers] == [1e-4, 1e-3, 1e-2]
    assert learn.recorder.values == rec


def test_no_writable_model_dir_needed(tiny_learner, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where fastai wants path/model_dir")
    learn = mk(tiny_learner, blocker)
    w = weights(learn)
    r = find_lr(learn, num_it=25, end_lr=1e-2)
    assert len(r.losses) > 0 and same_weights(w, weights(learn))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]
    with pytest.raises(OSError), learn.no_bar():  # fastai saves a temp model under path/model_dir
        learn.lr_find(num_it=25, end_lr=1e-2, show_plot=False)


# ---------- discriminative groups ----------

@pytest.mark.parametrize("lr_ratios, ratios", [
    (slice(1e-4, 1e-2), [0.01, 0.1, 1.0]),  # fastai's even_mults, as in fit
    (np.array([2e-4, 1e-3, 4e-3]), [0.05, 0.25, 1.0]),
    (None, [1 / 9, 1 / 3, 1.0]),  # the optimizer's current per-group LRs
])
def test_groups_swept_together_keeping_ratios(tiny_learner, tmp_path, lr_ratios, ratios):
    learn = mk(tiny_learner, tmp_path)
    learn.create_opt()
    learn.opt.set_hyper("lr", [1e-3, 3e-3, 9e-3])
    log = LRLog()
    r = find_lr(learn, num_it=25, end_lr=1e-2, lr_ratios=lr_ratios, cbs=[log])
    seen = np.array(log.lrs)
    assert seen.shape == (len(r.losses), 3)
    np.testing.assert_allclose(seen / seen[:, -1:], np.tile(ratios, (len(seen), 1)), rtol=1e-9)
    np.testing.assert_allclose(seen[:, -1], r.lrs)  # reported LR is the top group's
    np.testing.assert_allclose(r.group_lrs, r.suggestion * np.array(ratios), rtol=1e-9)
    assert [h["lr"] for h in learn.opt.hypers] == [1e-3, 3e-3, 9e-3]  # restored


def test_one_group_model_has_no_group_lrs_and_rejects_a_slice(tiny_learner, tmp_path):
    learn = mk(tiny_learner, tmp_path, splitter=False)
    r = find_lr(learn, num_it=25, end_lr=1e-2)
    assert r.group_lrs is None
    with pytest.raises(ValueError, match="one layer group"):
        find_lr(learn, num_it=30, lr_ratios=slice(1e-5, 1e-3))
    with pytest.raises(ValueError, match="3 values"):
        find_lr(learn, num_it=30, lr_ratios=[1e-3, 1e-2, 1e-1])


# ---------- bad input ----------

def test_empty_training_set_is_a_clear_error_where_fastai_divides_by_zero(tiny_learner, tmp_path):
    for kw in ({"n_train": 0}, {"n_train": 8, "bs": 16}):
        learn = mk(tiny_learner, tmp_path, **kw)
        learn.dls.train.drop_last = True  # 8 items, bs 16: no full batch
        with pytest.raises(ValueError, match="no batches"):
            find_lr(learn)
        with pytest.raises(ZeroDivisionError), learn.no_bar():
            learn.lr_find(show_plot=False)


@pytest.mark.parametrize("kw, match", [
    ({"start_lr": 0}, "start_lr"), ({"end_lr": float("nan")}, "end_lr"),
    ({"start_lr": 1e-2, "end_lr": 1e-3}, "larger than start_lr"), ({"num_it": 10}, "num_it"),
])
def test_bad_arguments(tiny_learner, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        find_lr(mk(tiny_learner, tmp_path), **kw)


def test_too_few_finite_points_is_a_clear_error_and_still_restores(tiny_learner, tmp_path):
    learn = lr_loss_learner(tiny_learner, tmp_path, nan_above=1e-6)
    w = weights(learn)
    with pytest.raises(ValueError, match="lower start_lr") as e:
        find_lr(learn, num_it=100)
    assert "non_finite" in str(e.value)
    assert same_weights(w, weights(learn)) and learn.opt is None


# ---------- suggestions on synthetic curves ----------

LRS = np.geomspace(1e-7, 10, 100)


def u_curve():
    """Flat, a drop centred at 3e-4 over ~2 decades, a minimum near 3e-2, then a blow-up."""
    x = np.log10(LRS)
    return 2.0 - 1.5 / (1 + np.exp(-1.5 * (x + 3.5))) + 0.05 * np.exp(2.5 * (x + 1.5))


def test_u_curve_suggestion_is_on_the_descent_below_the_minimum():
    losses = u_curve()
    sugg, s = suggest_lrs(LRS, losses)
    lr_min = LRS[losses.argmin()]
    assert lr_min / 100 <= s <= lr_min / 3
    # fastai's valley lands halfway (in log) between start_lr and the minimum, on the flat part
    # of a clean curve; the clamp lifts it onto the descent
    assert sugg["valley"] < s
    x = np.log10(LRS)
    at = np.interp(np.log10(s), x, losses)
    assert at < losses[0] - 0.4 * (losses[0] - losses.min())  # loss clearly falling already
    assert np.interp(np.log10(s), x, np.gradient(losses, x)) < 0  # and still falling
    assert sugg["minimum"] == pytest.approx(lr_min / 10)


def test_nan_tail_is_ignored():
    losses = u_curve()
    tail = losses.copy()
    tail[70:] = np.nan
    tail[75] = 1.0  # a finite value after a NaN must not come back
    assert suggest_lrs(LRS, tail) == suggest_lrs(LRS[:70], losses[:70])


def test_noisy_flat_curve_fastai_disagrees_ours_stays_in_window():
    rng = np.random.default_rng(0)
    losses = 1.0 + 0.02 * rng.standard_normal(len(LRS))
    sugg, s = suggest_lrs(LRS, losses)
    vals = np.array(list(sugg.values()))
    assert vals.max() / vals.min() > 100  # fastai's four: orders of magnitude apart
    lr_min = LRS[losses.argmin()]
    assert lr_min / 100 * (1 - 1e-12) <= s <= lr_min / 3 * (1 + 1e-12) and math.isfinite(s)


def test_suggestion_never_leaves_the_swept_range():
    # the lowest loss at the very first point: lr_min/3 would lie below anything measured
    losses = np.linspace(1.0, 2.0, len(LRS))
    _, s = suggest_lrs(LRS, losses)
    assert s == LRS[0]


@pytest.mark.parametrize("valley, expected", [
    (1e-3, 1e-3),  # inside [lr_min/100, lr_min/3]: valley itself
    (1e-9, "lo"), (5.0, "hi"),  # outside: clamped to the window's edge
    (float("nan"), "tenth"), (float("inf"), "tenth"), (0.0, "tenth"), (-1e-3, "tenth"),  # no valley
])
def test_suggestion_is_valley_clamped_into_the_window_or_a_tenth_of_the_minimum(monkeypatch, valley,
                                                                                  expected):
    from fastlesson import finder

    monkeypatch.setitem(finder.FASTAI_METHODS, "valley", lambda lrs, losses, n: (valley, None))
    losses = u_curve()
    lr_min = LRS[losses.argmin()]
    assert 1e-3 < lr_min / 3 and lr_min / 100 < 1e-3  # the inside case really is inside
    sugg, s = suggest_lrs(LRS, losses)
    want = {"lo": lr_min / 100, "hi": lr_min / 3, "tenth": lr_min / 10}.get(expected, expected)
    assert s == pytest.approx(want, rel=1e-12)
    assert sugg["valley"] == valley or math.isnan(valley)


def test_non_positive_or_non_finite_lrs_end_the_usable_prefix():
    losses = u_curve()
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        lrs = LRS.copy()
        lrs[60] = bad
        assert suggest_lrs(lrs, losses) == suggest_lrs(LRS[:60], losses[:60])


def test_num_it_must_leave_min_points_after_the_skips(tiny_learner, tmp_path):
    learn = mk(tiny_learner, tmp_path)
    # 23 - 23 // 10 - 5 = 16 points left; 22 leaves 15
    with pytest.raises(ValueError, match="num_it=22 is too small.*num_it >= 23"):
        find_lr(learn, num_it=22)


def test_exactly_min_points_is_enough():
    lrs, losses = LRS[::6][:MIN_POINTS], u_curve()[::6][:MIN_POINTS]
    _, s = suggest_lrs(lrs, losses)
    assert lrs[0] <= s <= lrs[-1]
    with pytest.raises(ValueError, match=f"only {MIN_POINTS - 1} finite"):
        suggest_lrs(lrs[:-1], losses[:-1])


def test_too_few_points_for_suggestions():
    with pytest.raises(ValueError, match=f"need {MIN_POINTS}"):
        suggest_lrs(LRS[:10], u_curve()[:10])
    with pytest.raises(ValueError, match="finite"):
        suggest_lrs(LRS, np.r_[u_curve()[:5], np.full(95, np.inf)])


# ---------- plot ----------

def test_plot_returns_figure_marks_suggestion_and_writes_png(tiny_learner, tmp_path):
    r = find_lr(mk(tiny_learner, tmp_path), num_it=25, end_lr=1e-2)
    fig = r.plot()
    ax = fig.axes[0]
    assert isinstance(fig, Figure) and ax.get_xscale() == "log"
    assert any(np.allclose(line.get_xdata(), r.suggestion) for line in ax.get_lines())
    labels = ax.get_legend_handles_labels()[1]
    assert all(any(lbl.startswith(n) for lbl in labels) for n in (*r.suggestions, "suggestion"))
    out = tmp_path / "plots" / "lr.png"
    r.plot(path=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["lr.png"]  # no temp file left behind
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    assert r.plot(ax=ax2) is fig2 and ax2.get_xscale() == "log"


def curve_result(window=(5, 45)):
    """A made-up range test: a U-shaped loss with a raw blow-up over the last 5 batches."""
    from fastlesson.finder import _smooth

    lrs = np.logspace(-6, 0, 50)
    losses = 2.0 - 1.5 * np.exp(-((np.log10(lrs) + 2.5) ** 2))
    losses[-5:] = [5.0, 9.0, 20.0, 40.0, 80.0]
    sm = _smooth(losses)
    sugg = {"valley": 1e-4, "slide": 3e-4, "steep": 1e-5, "minimum": 3e-3}
    return LRFinderResult(lrs, losses, sm, sugg, 2e-4, "diverged", window=window)


@pytest.mark.parametrize("window", [(5, 45), None])
def test_plot_shows_the_curves_and_each_suggestion_on_the_smoothed_curve(window):
    r = curve_result(window)
    ax = r.plot().axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["loss (raw)"].get_xdata(), r.lrs)
    np.testing.assert_array_equal(lines["loss (raw)"].get_ydata(), r.losses)
    np.testing.assert_array_equal(lines["loss (smoothed)"].get_xdata(), r.lrs)
    np.testing.assert_array_equal(lines["loss (smoothed)"].get_ydata(), r.smoothed)
    lo, hi = window or (0, 50)
    for name, lr in r.suggestions.items():  # a marker at the suggested LR, on the smoothed curve
        (marker,) = [line for label, line in lines.items() if label == f"{name} {lr:.1e}"]
        assert marker.get_marker() == "o" and marker.get_linestyle() == "None"
        y = np.interp(np.log10(lr), np.log10(r.lrs[lo:hi]), r.smoothed[lo:hi])
        np.testing.assert_allclose([*marker.get_xdata(), *marker.get_ydata()], [lr, y])
    vline = lines["suggestion 2.0e-04"]
    assert list(vline.get_xdata()) == [2e-4, 2e-4] and vline.get_linestyle() == "--"
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("learning rate (top group)", "train loss")
    assert ax.get_title() == "LR range test (diverged, 50 batches)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)


def test_plot_y_range_fits_the_analysed_window_not_the_blow_up():
    r = curve_result()
    bottom, top = r.plot().axes[0].get_ylim()
    shown = np.r_[r.smoothed[5:45], r.losses[5:45], r.smoothed[0]]
    lo, hi = shown.min(), shown.max()
    assert bottom == pytest.approx(lo - 0.1 * (hi - lo)) and top == pytest.approx(hi + 0.25 * (hi - lo))
    assert r.losses[-1] > top  # the raw blow-up runs off the top instead of flattening the curve
    # no window: the range is the whole smoothed curve's, its blow-up included
    r.window = None
    assert r.smoothed[-1] == r.smoothed.max() < r.plot().axes[0].get_ylim()[1] < r.losses.max()
    # a flat curve still gets a visible range, centred on it
    flat = LRFinderResult(r.lrs, np.full(50, 0.5), np.full(50, 0.5), r.suggestions, 2e-4, "completed")
    bottom, top = flat.plot().axes[0].get_ylim()
    assert bottom == pytest.approx(0.5 - 0.1 * 5e-4) and top == pytest.approx(0.5 + 0.25 * 5e-4)
    zero = LRFinderResult(r.lrs, np.zeros(50), np.zeros(50), r.suggestions, 2e-4, "completed")
    bottom, top = zero.plot().axes[0].get_ylim()
    assert bottom < 0 < top and top - bottom < 1e-9


# ---------- stop rule and window on low, noisy curves and sweeps cut short ----------

class ScriptedLoss(nn.Module):
    """Returns `values[i]` for the i-th training batch (with a zero gradient path through `pred`), so
    the range test sees an exact loss curve; NaN past the end."""

    def __init__(self, values):
        super().__init__()
        self.values, self.i = list(values), 0

    def forward(self, pred, y):
        v = self.values[self.i] if self.i < len(self.values) else float("nan")
        self.i += 1
        return pred.sum() * 0 + v


def scripted_learner(tiny_learner, tmp_path, values):
    learn = mk(tiny_learner, tmp_path)
    learn.loss_func = ScriptedLoss(values)
    return learn


def low_noisy_curve(n=100, seed=0):
    """A well-fitted head's range test: loss ~0.05 with batch-to-batch noise and a few 10-15x batches
    (one at batch 3), flat until the LR gets large, then a real blow-up over the last 15 batches."""
    rng = np.random.default_rng(seed)
    loss = 0.05 * np.exp(0.5 * rng.standard_normal(n))
    loss[[2, 30, 55]] = [0.6, 0.7, 0.75]  # single noisy batches, 12-15x the typical loss
    loss[n - 15:] *= np.geomspace(1, 300, 15)  # the LR is too high: a persistent, growing rise
    return loss


def test_fastai_rule_stops_a_low_noisy_curve_at_batch_3():
    """The defect: fastai's bare rule (smoothed > 4x best, from batch 1) on the curve above."""
    from fastlesson.finder import _smooth

    sm = _smooth(low_noisy_curve())
    first_stop = next(i for i in range(len(sm)) if sm[i] > 4 * sm[: i + 1].min())
    assert first_stop == 2  # the third batch, as in the default recipe run's step 7


def test_low_noisy_curve_runs_to_the_real_rise_and_suggests(tiny_learner, tmp_path):
    values = low_noisy_curve()
    r = find_lr(scripted_learner(tiny_learner, tmp_path, values), num_it=100)
    assert r.stop_reason == "diverged"
    assert 85 <= len(r.losses) < 100  # stopped inside the blow-up, not on a noisy batch
    np.testing.assert_allclose(r.losses, values[: len(r.losses)], rtol=1e-6)
    assert r.lrs[0] <= r.suggestion <= r.lrs[-1] and math.isfinite(r.suggestion)
    assert r.window == (len(r.losses) // 10, len(r.losses) - 5)


def test_divergence_rule_needs_a_rise_that_persists():
    from fastlesson.finder import diverged

    assert not diverged(0.25, 0.05, [0.05, 0.04, 1.0, 0.06, 0.05])  # smoothed up by one batch: no
    assert diverged(0.25, 0.05, [0.1, 0.3, 0.5, 0.9, 2.0])  # most recent batches high: yes
    assert not diverged(0.15, 0.05, [0.3, 0.5, 0.9, 2.0, 4.0])  # smoothed not yet 4x


def test_divergence_rule_is_strictly_above_the_limit():
    from fastlesson.finder import DIVERGE_FACTOR, diverged

    limit = DIVERGE_FACTOR * 0.25  # exact in binary floating point
    assert diverged(limit + 0.01, 0.25, [limit + 0.01] * 5)
    assert not diverged(limit, 0.25, [limit + 0.01] * 5)  # smoothed at the limit: not yet
    assert not diverged(limit + 0.01, 0.25, [limit] * 5)  # median at the limit: not yet


def test_smoothing_is_fastais_avg_smooth_loss():
    """The independent reference: fastai's own AvgSmoothLoss metric fed the same losses."""
    from types import SimpleNamespace

    from fastai.learner import AvgSmoothLoss

    from fastlesson.finder import _smooth

    losses = np.r_[np.linspace(3.0, 1.0, 20), np.random.default_rng(0).uniform(0.5, 4.0, 20)]
    ref, metric = [], AvgSmoothLoss()
    for x in losses:
        metric.accumulate(SimpleNamespace(loss=torch.tensor(x, dtype=torch.float32)))
        ref.append(float(metric.value))
    np.testing.assert_allclose(_smooth(losses), ref, rtol=1e-5)
    np.testing.assert_allclose(_smooth(losses, beta=0.5)[:2], [3.0, (0.5 * 3.0 + losses[1]) / 1.5])


def test_nan_after_30_batches_still_suggests_from_the_30_finite_points(tiny_learner, tmp_path):
    """find_lr(num_it=100) used to drop 10% of num_it (10 points) plus the last 5: 15 < 16 left."""
    rng = np.random.default_rng(1)
    values = 2.0 - np.linspace(0, 1.0, 30) + 0.01 * rng.standard_normal(30)  # NaN from batch 31
    r = find_lr(scripted_learner(tiny_learner, tmp_path, values), num_it=100)
    assert r.stop_reason == "non_finite" and len(r.losses) == 30
    assert r.window == (3, 25) and np.isfinite(r.suggestion)
    assert r.lrs[3] <= r.suggestion <= r.lrs[24]


@pytest.mark.parametrize("n, window", [
    (100, (10, 95)), (30, (3, 25)), (24, (2, 19)),  # the usual 10% + 5 skips
    (20, (0, 16)), (16, (0, 16)),  # enough points, but the skips would leave < 16: they shrink
    (12, (0, 12)),  # too few either way: all of them, and suggest_lrs says so
])
def test_suggest_window(n, window):
    from fastlesson.finder import suggest_window

    assert suggest_window(n) == window
    lo, hi = window
    assert (hi - lo >= MIN_POINTS) == (n >= MIN_POINTS)


def test_a_sweep_cut_short_below_min_points_is_still_a_clear_error(tiny_learner, tmp_path):
    values = np.linspace(2.0, 1.0, 14)  # NaN from batch 15: 14 < 16 finite points
    with pytest.raises(ValueError, match="only 14 finite loss points .* need 16"):
        find_lr(scripted_learner(tiny_learner, tmp_path, values), num_it=100)


# ---------- the lesson's rule for an unfrozen model ----------

def test_rise_lr_is_where_the_smoothed_loss_passes_its_minimum_by_a_quarter():
    from types import SimpleNamespace

    from fastlesson.finder import rise_lr

    lrs = np.logspace(-7, 1, 81)  # 10 points a decade
    wobble = 0.02 * np.sin(np.arange(81))  # a flat, noisy start: valley-style rules land anywhere on it
    flat_then_up = np.where(lrs <= 1e-2, 0.6 + wobble, 0.6 * lrs / 1e-2)
    res = SimpleNamespace(lrs=lrs, smoothed=flat_then_up)
    at = rise_lr(res)
    assert at == lrs[np.flatnonzero((lrs > 1e-2) & (flat_then_up > flat_then_up.min() * 1.25))[0]]
    assert 1e-2 < at < 2e-2
    assert rise_lr(SimpleNamespace(lrs=lrs, smoothed=np.full(81, 0.5))) == lrs[-1]  # never rises
    # a low first point (noisy debiased start, outside find_lr's window) and a bump that comes back
    # down are not the rise (seen on a 160-image data set: "rises at 1.5e-7")
    noisy = flat_then_up.copy()
    noisy[1], noisy[30:33] = 0.3, 0.9
    assert rise_lr(SimpleNamespace(lrs=lrs, smoothed=noisy, window=(8, 76))) == at
