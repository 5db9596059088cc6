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
# # The LR range test: finding a learning rate
#
# **What you will learn**
#
# - how the LR range test (Smith 2015) works: train for a few dozen batches while the LR grows
#   exponentially, and record the loss at every step;
# - how to read the loss-vs-LR plot;
# - fastai's four suggestions (`valley`, `slide`, `steep`, `minimum`), fastlesson's `suggestion`, and
#   why they differ;
# - what happens past divergence, including a run whose loss becomes NaN, and that `find_lr` gives
#   you back exactly the weights you had before the test.

# %%
import os

# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.
SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"

# %matplotlib inline
import numpy as np
import pandas as pd
import torch
from fastai.torch_core import set_seed

from fastlesson import create_learner, find_lr, load_data

SIZE = 32 if SMALL else 128  # px, side of the training images
BS = 16 if SMALL else 32  # images per batch
NUM_IT = 30 if SMALL else 100  # batches in the range test (fastai's default is 100)

# %% [markdown]
# ## 1. Run the range test
#
# We take the shipped flower sample (10 classes) and a pretrained EfficientNet-Lite0 whose body is
# frozen, so only the new head trains, as in step 2 of the recipe. `find_lr` sweeps the LR from
# `start_lr` (1e-7) to `end_lr` (10) over `NUM_IT` batches and stops early when the smoothed loss
# exceeds 4x its best value (the network has *diverged*).

# %%
data = load_data("sample", size=SIZE, bs=BS)
set_seed(42)
learn = create_learner(data.dls, "tf_efficientnet_lite0", pretrained=True)

res = find_lr(learn, num_it=NUM_IT)
print(f"stopped: {res.stop_reason} after {len(res.losses)} batches, at lr={res.lrs[-1]:.2e}")
res.plot()

# %% [markdown]
# **What to look for in the plot**
#
# - On the left the LR is too small to change anything: the loss is flat.
# - Then the loss falls: this is the useful range. The best LR is *in the steep part of the
#   descent*, not at the minimum: at the minimum the LR is already so high that the next step
#   makes things worse.
# - On the right the loss shoots up: the network diverged and the test stopped (`stop_reason`).
# - The grey line is the raw per-batch loss; the blue one is smoothed the way fastai smooths it
#   (a debiased moving average). All suggestions are read off the smoothed curve.
#
# ## 2. Four suggestions, and the one the recipe uses
#
# fastai offers four ways of reading this curve:
#
# | name | what it picks |
# |---|---|
# | `minimum` | the LR at the lowest loss, divided by 10 |
# | `steep` | where the loss falls fastest (steepest negative slope) |
# | `valley` | the middle of the longest stretch of steady descent |
# | `slide` | the LR where the slope flattens out, "sliding" back from the divergence |
#
# They look at different features of the curve, so they can land orders of magnitude apart: `steep`
# can fire on one noisy drop, `valley` can sit in the first, still-flat points of a noisy curve, and
# `slide` wanders on a flat curve. fastlesson's `suggestion` anchors on the most stable feature, the
# LR of the lowest smoothed loss `lr_min`: it takes fastai's `valley` and clamps it into
# `[lr_min/100, lr_min/3]` (and into the LRs the test actually measured), so it is always below the
# point where the loss stops falling and never so far below that training barely moves. On a clean
# fine-tuning curve `valley` already sits in that window and is returned unchanged. (In the test
# suite's tiny run the curve is mostly noise, so expect odd numbers there.)

# %%
lr_min = res.lrs[res.window[0]:res.window[1]][np.argmin(res.smoothed[res.window[0]:res.window[1]])]
table = pd.DataFrame(
    {"lr": {**res.suggestions, "fastlesson suggestion": res.suggestion, "lowest loss (lr_min)": lr_min}})
table["x lr_min"] = table["lr"] / lr_min
# what this section teaches: the suggestion lies in [lr_min/100, lr_min/3], and never below the
# lowest LR suggested from (then it is that LR: a curve whose minimum is at its start)
first = res.lrs[res.window[0]]
assert lr_min / 100 <= res.suggestion <= max(lr_min / 3, first) * (1 + 1e-9), (res.suggestion, lr_min)
table.style.format({"lr": "{:.2e}", "x lr_min": "{:.3f}"})

# %% [markdown]
# **Look for:** how far apart the four fastai suggestions are (the `x lr_min` column), and that
# fastlesson's suggestion lies between 1/100 and 1/3 of the LR with the lowest loss.
#
# ## 3. Past divergence: a run that hits NaN
#
# With `stop_div=False` the test does not stop at divergence and keeps raising the LR. Here we go all
# the way to `end_lr=1e8`: the weights blow up, the loss grows by orders of magnitude per batch and
# finally becomes non-finite (inf or NaN). Plain fastai's `lr_find` keeps stepping on NaN losses (its
# divergence test `nan > 4 * best` is `False`); `find_lr` stops at the first non-finite loss, before
# that batch updates the weights, keeps only the finite points, and restores the model, the optimizer
# state and the random number generators from copies in memory, even after an error or Ctrl-C.
#
# We copy the weights before the test and compare them afterwards.

# %%
before = {k: v.clone() for k, v in learn.model.state_dict().items()}

res_nan = find_lr(learn, start_lr=1e-5, end_lr=1e8, num_it=40 if SMALL else 100, stop_div=False)
print(f"stopped: {res_nan.stop_reason} after {len(res_nan.losses)} finite batches; "
      f"last finite loss {res_nan.losses[-1]:.3g} at lr={res_nan.lrs[-1]:.2e}")

after = learn.model.state_dict()
same = all(torch.equal(before[k], after[k]) for k in before)
print("weights after the test are bit-for-bit the weights before:", same)
assert res_nan.stop_reason == "non_finite", res_nan.stop_reason  # it diverged all the way to NaN/inf
assert np.isfinite(res_nan.losses).all()  # and kept only the finite points
assert same and before.keys() == after.keys()  # yet every weight and buffer came back bit-for-bit

# %% [markdown]
# **Look for:** on the left, `find_lr`'s own plot: on a linear axis the blow-up flattens everything
# before it, yet the suggestions (read from the finite points, minus the first 10% and the last 5,
# as fastai does) still sit where the loss was low; on the right, the
# same raw losses on a log axis, climbing over many orders of magnitude before the next batch's loss
# stops being a number. The suggestions come from the finite part only, so they stay usable, but a
# test that diverges this hard means `end_lr` is far too high.

# %%
import matplotlib.pyplot as plt

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
res_nan.plot(ax=ax1)
ax2.loglog(res_nan.lrs, res_nan.losses, ".-", label="loss (raw, finite batches)")
ax2.axvline(res_nan.lrs[-1], color="C3", ls=":", label="next batch: non-finite loss, test stopped")
ax2.set_xlabel("learning rate")
ax2.set_ylabel("train loss (log scale)")
ax2.legend()
plt.show()

# %% [markdown]
# ## Recap
#
# - The range test trains a few dozen batches at exponentially growing LRs; pick an LR where the
#   smoothed loss is still clearly falling, below the minimum.
# - fastai's `valley`, `slide`, `steep` and `minimum` read different features of the curve and can
#   disagree by orders of magnitude; fastlesson's `suggestion` is `valley` clamped to
#   `[lr_min/100, lr_min/3]`.
# - `find_lr` stops at divergence (`stop_reason="diverged"`) or at the first NaN/inf loss
#   (`"non_finite"`), never trains on a NaN, and always puts the weights back exactly as they were.
