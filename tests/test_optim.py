"""Lookahead through fastai's OptimWrapper, and the named optimizer registry."""

from __future__ import annotations

import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.optimizer import SGD, OptimWrapper
from fastai.optimizer import Lookahead as FastaiLookahead

from fastlesson.optim import OPTIMIZERS, Lookahead, lookahead, opt_func


def _quadratic_steps(opt, w, n):
    """n steps on loss = 0.5 * w**2 (grad = w); returns w after each step."""
    out = []
    for _ in range(n):
        opt.zero_grad()
        (0.5 * w**2).sum().backward()
        opt.step()
        out.append(w.item())
    return out


def test_update_rule_matches_hand_computed_reference():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), k=2, alpha=0.5)
    # SGD: w <- 0.9 w.  Step 2: fast 0.81, slow 1 + 0.5 (0.81 - 1) = 0.905.
    # Step 4: fast 0.905 * 0.81 = 0.73305, slow 0.905 + 0.5 (0.73305 - 0.905) = 0.819025.
    expected = [0.9, 0.905, 0.8145, 0.819025, 0.7371225]
    np.testing.assert_allclose(_quadratic_steps(opt, w, 5), expected, rtol=1e-6)
    assert opt.n_steps == 5


def test_matches_fastai_lookahead_on_sgd_momentum():
    """Trusted reference: fastai's Lookahead(SGD) (fastai optimizers only) on the same problem."""
    torch.manual_seed(0)
    target = torch.randn(5)
    w1 = torch.nn.Parameter(torch.zeros(5))
    w2 = torch.nn.Parameter(torch.zeros(5))
    ours = Lookahead(torch.optim.SGD([w1], lr=0.05, momentum=0.9), k=3, alpha=0.4)
    ref = FastaiLookahead(SGD([w2], lr=0.05, mom=0.9), k=3, alpha=0.4)
    for _ in range(10):
        for w, opt in ((w1, ours), (w2, ref)):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(w1.detach(), w2.detach())


@pytest.mark.parametrize("kw", [dict(k=0), dict(k=2.5), dict(alpha=0.0), dict(alpha=1.5), dict(alpha=-0.1)])
def test_bad_k_alpha_raise(kw):
    w = torch.nn.Parameter(torch.zeros(1))
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        Lookahead(torch.optim.SGD([w], lr=0.1), **kw)
    with pytest.raises(ValueError, match=name):
        lookahead(torch.optim.SGD, **kw)


def test_lookahead_rejects_non_torch_optimizer():
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        lookahead(SGD)  # a fastai optimizer function


def test_state_dict_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = Lookahead(torch.optim.RAdam(model.parameters(), lr=0.01), k=3, alpha=0.5)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def step(m, o):
        o.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        o.step()

    for _ in range(4):  # mid-cycle: slow weights differ from fast ones
        step(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pth")
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(model.state_dict())
    opt2 = Lookahead(torch.optim.RAdam(model2.parameters(), lr=0.5), k=6, alpha=0.9)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pth", weights_only=True))
    assert (opt2.k, opt2.alpha, opt2.n_steps) == (3, 0.5, 4)
    assert opt2.param_groups is opt2.optimizer.param_groups and opt2.param_groups[0]["lr"] == 0.01
    for p, p2 in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(opt.state[p]["slow"], opt2.state[p2]["slow"])
    for _ in range(4):  # continues identically, through the next sync
        step(model, opt)
        step(model2, opt2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, p2)


def test_deepcopy_keeps_inner_optimizer_and_shared_groups():
    import copy

    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), k=2)
    _quadratic_steps(opt, w, 3)
    dup = copy.deepcopy(opt)
    assert (dup.k, dup.n_steps) == (2, 3) and dup.param_groups is dup.optimizer.param_groups
    dup.param_groups[0]["lr"] = 0.5
    assert dup.optimizer.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["lr"] == 0.1


def test_load_state_dict_rejects_plain_optimizer_state():
    w = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="Lookahead state_dict"):
        Lookahead(torch.optim.SGD([w], lr=0.1)).load_state_dict(torch.optim.SGD([w], lr=0.1).state_dict())


class _InnerHypers(Callback):
    """Record the inner torch optimizer's lr and beta1 per group, after fastai's ParamScheduler ran."""
    order = 70

    def before_fit(self):
        self.lrs, self.betas1 = [], []

    def before_batch(self):
        if not self.training:
            return
        inner = self.learn.opt.opt.optimizer
        self.lrs.append([g["lr"] for g in inner.param_groups])
        self.betas1.append([g["betas"][0] for g in inner.param_groups])


def test_fit_one_cycle_drives_inner_lr_and_betas(tiny_learner):
    learn = tiny_learner(opt_func=lookahead(torch.optim.RAdam, k=2))
    rec = _InnerHypers()
    learn.fit_one_cycle(2, 1e-2, cbs=rec)
    assert isinstance(learn.opt, OptimWrapper) and isinstance(learn.opt.opt, Lookahead)
    lrs, moms = np.array(rec.lrs)[:, -1], np.array(rec.betas1)[:, -1]
    np.testing.assert_allclose(lrs, learn.recorder.hps["lr"])  # what fastai scheduled is what RAdam used
    np.testing.assert_allclose(moms, learn.recorder.hps["mom"])
    assert lrs.max() == pytest.approx(1e-2, rel=0.05) and lrs[0] == pytest.approx(1e-2 / 25) and lrs[-1] < 1e-3
    assert moms[0] == pytest.approx(0.95) and moms.min() == pytest.approx(0.85, abs=0.01)


def test_discriminative_lrs_reach_inner_groups(tiny_learner):
    learn = tiny_learner(opt_func=lookahead(torch.optim.Adam))
    rec = _InnerHypers()
    learn.fit_one_cycle(1, slice(1e-4, 1e-2), cbs=rec)
    lrs = np.array(rec.lrs)
    assert lrs.shape[1] == 3  # one inner group per layer group of the splitter
    np.testing.assert_allclose(lrs / lrs[:, -1:], np.tile([1e-2, 1e-1, 1.0], (len(lrs), 1)), rtol=1e-6)
    assert lrs[:, -1].max() == pytest.approx(1e-2, rel=0.05)


def test_freeze_keeps_frozen_params_fixed(tiny_learner):
    learn = tiny_learner(opt_func=lookahead(torch.optim.SGD, k=2, momentum=0.9))
    learn.fit(1, 1e-2)  # unfrozen first, so slow weights of the body lag its fast weights
    learn.freeze()
    frozen = {n: p.detach().clone() for n, p in learn.model.named_parameters() if not p.requires_grad}
    head = [p.detach().clone() for p in learn.model[1].parameters()]
    learn.fit_one_cycle(2, 1e-2)
    assert frozen  # body convs are frozen (BN stays trainable, as fastai's train_bn does)
    for n, p in learn.model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p.detach(), frozen[n], rtol=0, atol=0)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(head, learn.model[1].parameters()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_named_optimizers_train(tiny_learner, name):
    learn = tiny_learner(opt_func=opt_func(name))
    before = learn.validate()[0]
    learn.fit_one_cycle(2, 1e-2)
    assert learn.validate()[0] < before
    if name == "lookahead-radam":  # the flowers seed's RAdam+Lookahead
        assert isinstance(learn.opt.opt.optimizer, torch.optim.RAdam) and learn.opt.opt.k == 6


def test_opt_func_names_and_unknown():
    assert OPTIMIZERS == ("adam", "sgd", "radam", "lookahead-radam", "ranger")
    assert opt_func("RAdam") is opt_func("radam")
    with pytest.raises(ValueError, match="adamw.*adam, sgd, radam, lookahead-radam, ranger"):
        opt_func("adamw")


def test_opt_func_is_picklable_for_export(tiny_learner):
    import pickle

    f = pickle.loads(pickle.dumps(lookahead(torch.optim.RAdam, k=3)))
    opt = f([list(torch.nn.Linear(2, 2).parameters())], lr=1e-3)
    assert isinstance(opt.opt, Lookahead) and opt.opt.k == 3
