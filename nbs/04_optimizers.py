# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Optimizers: SGD, Adam, RAdam, Lookahead(RAdam) and ranger
#
# **What you will learn**
#
# - how to pick an optimizer by name with `opt_func(name)` and hand it to a learner;
# - how `Lookahead` wraps *any* PyTorch optimizer (here `torch.optim.RAdam`) and still follows fastai's
#   schedules through `OptimWrapper`;
# - how the five optimizers compare on the same data, model, schedule and epoch budget: loss curves on
#   one plot and a results table.

# %%
import os

# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.
SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"

# %matplotlib inline
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.optimizer import OptimWrapper
from fastai.torch_core import set_seed

from fastlesson import (
    OPTIMIZERS,
    Lookahead,
    create_learner,
    fit_one_cycle,
    load_data,
    lookahead,
    opt_func,
)

SIZE = 32 if SMALL else 128  # px, side of the training images
BS = 32  # images per batch
EPOCHS = 1 if SMALL else 5  # the same budget for every optimizer
# Peak one-cycle LR per optimizer: SGD needs a larger step than the adaptive ones (per-parameter scaling)
LRS = {"sgd": 1e-1, "adam": 1e-2, "radam": 1e-2, "lookahead-radam": 1e-2, "ranger": 1e-2}

# %% [markdown]
# ## 1. The optimizers
#
# | name | what it is |
# |---|---|
# | `sgd` | SGD with momentum 0.9 (fastai's `SGD`) |
# | `adam` | Adam: per-parameter step sizes from running averages of the gradient and its square |
# | `radam` | Rectified Adam: Adam with an automatic warm-up while the variance estimate is unreliable |
# | `lookahead-radam` | `torch.optim.RAdam` wrapped in `Lookahead(k=6, alpha=0.5)`, through fastai's `OptimWrapper` |
# | `ranger` | fastai's ranger: RAdam + Lookahead, written as a fastai optimizer |
#
# Lookahead keeps a slow copy of the weights; every `k` steps of the inner optimizer it moves the slow
# weights `alpha` of the way towards the fast ones and restarts the fast weights from there. It
# smooths the path and makes the result less sensitive to the LR.
#
# `opt_func(name)` returns what fastai's `Learner(..., opt_func=...)` expects; `create_learner` also
# takes the name directly. The Lookahead version is an `OptimWrapper` around our `Lookahead`, which
# shares its `param_groups` with the inner RAdam, so when a fastai schedule sets the LR (or momentum)
# the optimizer that actually steps sees it:

# %%
print("available:", OPTIMIZERS)
data = load_data("sample", size=SIZE, bs=BS)
learn = create_learner(data.dls, "tf_efficientnet_lite0", pretrained=True, opt_func="lookahead-radam")
learn.create_opt()
assert isinstance(learn.opt, OptimWrapper) and isinstance(learn.opt.opt, Lookahead)
inner = learn.opt.opt.optimizer  # the torch RAdam inside Lookahead
print(f"{type(learn.opt).__name__} -> {learn.opt.opt.__class__.__name__}(k={learn.opt.opt.k}, "
      f"alpha={learn.opt.opt.alpha}) -> {type(inner).__module__}.{type(inner).__name__}")
learn.opt.set_hyper("lr", 0.123)  # what fastai's schedulers do every batch
print("LR seen by the inner torch.optim.RAdam:", [g["lr"] for g in inner.param_groups])
assert [g["lr"] for g in inner.param_groups] == [0.123] * len(learn.opt.param_lists)

# the same thing for any other torch optimizer, e.g. AdamW with its own keyword arguments
adamw_la = lookahead(torch.optim.AdamW, k=5, alpha=0.5)

# %% [markdown]
# ## 2. Same data, same budget
#
# Each optimizer trains the head of the same pretrained EfficientNet-Lite0 (same seed, so the same
# initial head and batch order) for `EPOCHS` epochs of one-cycle at its LR from `LRS`. fastai's
# recorder keeps the smoothed training loss of every batch and the validation loss of every epoch.

# %%
curves, rows = {}, []
for name in OPTIMIZERS:
    dls = load_data("sample", size=SIZE, bs=BS).dls  # fresh loaders: the same batch order every run
    set_seed(42)  # the same head initialisation
    learn = create_learner(dls, "tf_efficientnet_lite0", pretrained=True, opt_func=opt_func(name))
    with learn.no_bar(), learn.no_logging():
        start_loss = learn.validate()[0]  # the untrained head's validation loss
        t0 = time.perf_counter()
        fit_one_cycle(learn, EPOCHS, LRS[name])
        seconds = time.perf_counter() - t0
    curves[name] = (np.array(learn.recorder.losses), np.array([v[1] for v in learn.recorder.values]))
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    rows.append({"optimizer": name, "lr": LRS[name], "epochs": EPOCHS, "start_valid_loss": start_loss,
                 "train_loss": train_loss, "valid_loss": valid_loss, "accuracy": acc, "seconds": seconds})
    assert valid_loss < start_loss, f"{name}: validation loss rose from {start_loss:.3f} to {valid_loss:.3f}"

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
n_batches = len(data.dls.train)
for name, (train, valid) in curves.items():
    ax1.plot(train, label=name)
    ax2.plot(np.arange(1, len(valid) + 1), valid, "o-", label=name)
ax1.set_xlabel("iteration (batch)")
ax1.set_ylabel("training loss (smoothed)")
ax2.set_xlabel("epoch")
ax2.set_ylabel("validation loss")
ax2.set_xticks(range(1, EPOCHS + 1))
ax1.legend()
plt.show()
pd.DataFrame(rows).set_index("optimizer").round(4)

# %% [markdown]
# **Look for:** how fast each training-loss curve falls in the first iterations (the adaptive methods
# usually lead early; RAdam's built-in warm-up starts a little slower than Adam: for its first few
# steps it has no reliable variance estimate and takes plain momentum steps, and Lookahead only syncs
# every `k=6` steps, so `radam`, `lookahead-radam` and `ranger` coincide at first), whether the curves
# are smooth or noisy (Lookahead and ranger are smoother), and in the table whether a faster start
# ends in a better validation loss. In the test suite (`SMALL`) the run is far too short to rank
# anything: run the notebook yourself for the real comparison, and repeat it with other seeds before
# drawing conclusions.

# %% [markdown]
# ## Recap
#
# - `opt_func(name)` gives fastai optimizers by name: `sgd`, `adam`, `radam`, `lookahead-radam`,
#   `ranger`; `create_learner(..., opt_func=name)` takes the name directly.
# - `lookahead(torch_optimizer_class, k, alpha)` wraps any PyTorch optimizer; through `OptimWrapper`,
#   fastai's one-cycle and discriminative LRs reach the optimizer that actually steps.
# - Compare optimizers with the same data, model, seed, schedule and epochs, each at a sensible LR.
