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
# # LR schedules: step, exponential, 1/t, one-cycle and SGDR
#
# **What you will learn**
#
# - how the classic decay schedules look per iteration: step decay, exponential decay
#   $\alpha_t = \alpha_0 e^{-kt}$ and $1/t$ decay $\alpha_t = \alpha_0 / (1 + kt)$;
# - fastai's one-cycle schedule (warm up, then cosine down);
# - SGDR (stochastic gradient descent with warm restarts): cosine cycles whose length grows with
#   `cycle_mult`, so `cycle_len=1, cycle_mult=2` gives cycles of 1 + 2 + 4 = 7 epochs;
# - how these schedules compare on a short training run on the shipped flower sample.

# %%
import os

# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.
SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"

# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from fastai.torch_core import set_seed

from fastlesson import (
    create_learner,
    fit_one_cycle,
    fit_sgdr,
    load_data,
    plot_schedules,
    schedule_preview,
    sgdr_cycle_lengths,
    sgdr_epochs,
    sgdr_lrs,
)

SIZE = 32 if SMALL else 128  # px, side of the training images
BS = 32  # images per batch
LR = 1e-2  # peak LR for the head (Adam)

# %% [markdown]
# ## 1. The classic decay schedules
#
# `schedule_preview(kind, n_iter, lr_max, **params)` returns the LR of every iteration (batch) for a
# named schedule, so we can look at them before training with any of them. All start at the same
# $\alpha_0$ = `lr_max`:
#
# - **step**: multiply by `gamma` every `step_size` iterations (a staircase);
# - **exponential**: $\alpha_0 e^{-kt}$, a straight line on a log axis;
# - **inverse_time** ($1/t$): $\alpha_0 / (1 + kt)$, falls fast at first, then very slowly.

# %%
N_ITER = 300  # iterations (batches) shown in the previews
LR0 = 0.1

classic = {
    "step (gamma=0.1 every 100 it)": schedule_preview("step", N_ITER, LR0, step_size=100, gamma=0.1),
    "exponential (k=0.015)": schedule_preview("exponential", N_ITER, LR0, k=0.015),
    "1/t (k=0.03)": schedule_preview("inverse_time", N_ITER, LR0, k=0.03),
}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), sharey=True)
for ax, (name, lrs) in zip(axes, classic.items()):
    ax.plot(lrs)
    ax.set_title(name)
    ax.set_xlabel("iteration")
axes[0].set_ylabel("learning rate")
plt.show()
# all three start at lr_max and only ever lower the LR
assert all(np.isclose(lrs[0], LR0) and (np.diff(lrs) <= 0).all() for lrs in classic.values())

# %% [markdown]
# On a log axis the differences are clearer: exponential decay is a straight line, step decay a
# staircase that follows it in jumps, and $1/t$ decay bends: it drops most in the first iterations and
# then stays at a relatively high LR for the rest of the run.

# %%
plot_schedules(classic, log_y=True)

# %% [markdown]
# ## 2. One-cycle
#
# fastai's `fit_one_cycle` ramps the LR up from `lr_max/div` to `lr_max` during the first
# `pct_start` of training, then anneals it with a cosine to `lr_max/div_final`. The warm-up lets the
# network reach a high LR safely (high LR = regularisation and fast progress), the long tail fine-tunes.
#
# **Look for:** the peak at 25% of the iterations, and the end far below the start.

# %%
one_cycle = schedule_preview("one_cycle", N_ITER, LR0)
print(f"start {one_cycle[0]:.4f}, peak {one_cycle.max():.4f} at iteration {one_cycle.argmax()}, "
      f"end {one_cycle[-1]:.2e}")
assert np.isclose(one_cycle.max(), LR0) and abs(one_cycle.argmax() - 0.25 * N_ITER) <= 1  # peak at 25%
assert one_cycle[-1] < one_cycle[0] / 100  # and the end far below the start
plot_schedules({"one-cycle": one_cycle})

# %% [markdown]
# ## 3. SGDR: cosine annealing with warm restarts
#
# SGDR anneals the LR along a cosine within a cycle and then jumps back to `lr_max` (a *restart*). The
# restart kicks the weights out of a narrow minimum; the ones that settle in wide, flat minima
# generalise better. With `cycle_mult=2` each cycle is twice as long as the one before, so with
# `cycle_len=1` (epoch) three cycles take 1 + 2 + 4 = 7 epochs.
#
# `sgdr_lrs` gives exactly the per-batch LRs that `fit_sgdr` applies to the head group.

# %%
N_BATCHES = 20  # batches per epoch in this preview
print("cycle lengths (epochs):", sgdr_cycle_lengths(3, cycle_len=1, cycle_mult=2))
print("total epochs:", sgdr_epochs(3, cycle_len=1, cycle_mult=2))

sgdr = sgdr_lrs(n_cycles=3, cycle_len=1, n_batches=N_BATCHES, lr_max=LR0, cycle_mult=2)
equal = sgdr_lrs(n_cycles=7, cycle_len=1, n_batches=N_BATCHES, lr_max=LR0, cycle_mult=1)
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.plot(sgdr, label="cycle_len=1, cycle_mult=2 (1+2+4 epochs)")
ax.plot(equal, alpha=0.5, label="cycle_len=1, cycle_mult=1 (7 x 1 epoch)")
for epoch in range(1, 8):
    ax.axvline(epoch * N_BATCHES, color="0.85", lw=0.8, zorder=0)
ax.set_xlabel(f"iteration ({N_BATCHES} per epoch; grey lines = epoch ends)")
ax.set_ylabel("learning rate")
ax.legend()
plt.show()
# the LR is back at lr_max at every restart (epochs 0, 1 and 3), and each cycle ends near zero
restarts = np.array([0, 1, 3]) * N_BATCHES
assert np.allclose(sgdr[restarts], LR0), sgdr[restarts]
assert (sgdr[np.r_[restarts[1:], len(sgdr)] - 1] < LR0 / 100).all()

# %% [markdown]
# **Look for:** each restart sits exactly on an epoch boundary (at 1 and 3 epochs for `cycle_mult=2`),
# which is where fastai validates and where a snapshot of the weights can be saved
# (`fit_sgdr(..., snapshot_dir=...)`). Every cycle ends near zero: the weights at the end of a cycle
# are the well-annealed ones.
#
# ## 4. All schedules on one plot

# %%
n = len(sgdr)  # 7 epochs x 20 batches
plot_schedules({
    "step": schedule_preview("step", n, LR0),
    "exponential": schedule_preview("exponential", n, LR0),
    "1/t": schedule_preview("inverse_time", n, LR0),
    "one-cycle": schedule_preview("one_cycle", n, LR0),
    "SGDR (1+2+4)": sgdr,
})

# %% [markdown]
# ## 5. A short training comparison
#
# Now the same pretrained EfficientNet-Lite0 head is trained on the shipped flower sample
# (10 classes) with three schedules and the same number of epochs: a constant LR (plain `learn.fit`),
# one-cycle, and SGDR. Each run starts from the same seed. In the test suite (`SMALL`) the images are
# tiny and the budget is 2 epochs, so the numbers there only show that the code runs; run the notebook
# yourself for the real comparison (128 px, 7 epochs).

# %%
data = load_data("sample", size=SIZE, bs=BS)
print(f"{data.n_train} training and {data.n_valid} validation images, {len(data.classes)} classes")

# SGDR sets the budget: 1+2+4 = 7 epochs, or 2 cycles of 1 epoch in the test suite
N_CYCLES, CYCLE_MULT = (2, 1) if SMALL else (3, 2)
EPOCHS = sgdr_epochs(N_CYCLES, cycle_len=1, cycle_mult=CYCLE_MULT)


runs = {
    "constant": lambda learn: learn.fit(EPOCHS, LR),
    "one-cycle": lambda learn: fit_one_cycle(learn, EPOCHS, LR),
    "SGDR": lambda learn: fit_sgdr(learn, N_CYCLES, cycle_len=1, lr_max=LR, cycle_mult=CYCLE_MULT),
}
rows, applied = [], {}
for name, fit in runs.items():
    dls = load_data("sample", size=SIZE, bs=BS).dls  # fresh loaders: the same batch order every run
    set_seed(42)  # the same head initialisation
    learn = create_learner(dls, "tf_efficientnet_lite0", pretrained=True)
    with learn.no_bar(), learn.no_logging():
        fit(learn)
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    rows.append({"schedule": name, "epochs": EPOCHS, "train_loss": train_loss,
                 "valid_loss": valid_loss, "accuracy": acc})
    applied[name] = np.array(learn.recorder.lrs)  # the LR fastai actually used, per batch
pd.DataFrame(rows).set_index("schedule").round(3)

# %% [markdown]
# The LRs the runs actually used (recorded by fastai per batch) are the schedules from above:
# **look for** the SGDR restarts on the epoch boundaries and one-cycle's warm-up.

# %%
plot_schedules(applied)
# what fit_sgdr applied is exactly sgdr_lrs' preview, so it is back at lr_max at every restart
n_batches = len(dls.train)
assert np.allclose(applied["SGDR"], sgdr_lrs(N_CYCLES, 1, n_batches, lr_max=LR, cycle_mult=CYCLE_MULT))
starts = np.cumsum([0, *sgdr_cycle_lengths(N_CYCLES, 1, CYCLE_MULT)[:-1]]) * n_batches
assert np.allclose(applied["SGDR"][starts], LR)
assert np.allclose(applied["constant"], LR)
one = applied["one-cycle"]
assert one[0] < LR / 10 and one.max() <= LR * (1 + 1e-9) and one[-1] < one.max() / 10  # warm-up, anneal

# %% [markdown]
# ## Recap
#
# - Step, exponential and $1/t$ decay only ever lower the LR; they differ in *how fast*.
#   `schedule_preview` shows any of them per iteration before you train.
# - One-cycle warms up to a high LR, then anneals far below the start.
# - SGDR restarts a cosine every cycle; `cycle_mult=2` doubles the cycle length (1+2+4 = 7 epochs),
#   and every restart falls on an epoch boundary. `sgdr_lrs` previews exactly what `fit_sgdr` applies.
# - Compare schedules with the same epochs and seed; the table above is the honest comparison
#   (run it at full size to see the real differences).
