"""Write the walkthrough notebooks in nbs/ from the cell lists below (no outputs, execution_count None).

Usage: python tools/make_notebooks.py [NAME ...]   (default: all; NAME like 02_lr_schedules)
Edit the cells here, regenerate, and commit the .ipynb files: this file keeps the review readable.
Every notebook's first code cell reads FASTLESSON_SMALL (set by the test suite's conftest.py) and picks
tiny sizes and 1-2 epochs when it is "1"; a person running it gets the real-size version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NBS = Path(__file__).resolve().parents[1] / "nbs"

SMALL_SWITCH = (
    'import os\n'
    '\n'
    '# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.\n'
    'SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"\n'
)


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# ----------------------------------------------------------------------------- 02 LR schedules

NB02 = [
    md("""
# LR schedules: step, exponential, 1/t, one-cycle and SGDR

**What you will learn**

- how the classic decay schedules look per iteration: step decay, exponential decay
  $\\alpha_t = \\alpha_0 e^{-kt}$ and $1/t$ decay $\\alpha_t = \\alpha_0 / (1 + kt)$;
- fastai's one-cycle schedule (warm up, then cosine down);
- SGDR (stochastic gradient descent with warm restarts): cosine cycles whose length grows with
  `cycle_mult`, so `cycle_len=1, cycle_mult=2` gives cycles of 1 + 2 + 4 = 7 epochs;
- how these schedules compare on a short training run on the shipped flower sample.
"""),
    code(SMALL_SWITCH + """
%matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from fastai.torch_core import set_seed

from fastlesson import (
    create_learner, fit_one_cycle, fit_sgdr, load_data, plot_schedules, schedule_preview,
    sgdr_cycle_lengths, sgdr_epochs, sgdr_lrs,
)

SIZE = 32 if SMALL else 128  # px, side of the training images
BS = 32  # images per batch
LR = 1e-2  # peak LR for the head (Adam)
"""),
    md("""
## 1. The classic decay schedules

`schedule_preview(kind, n_iter, lr_max, **params)` returns the LR of every iteration (batch) for a
named schedule, so we can look at them before training with any of them. All start at the same
$\\alpha_0$ = `lr_max`:

- **step**: multiply by `gamma` every `step_size` iterations (a staircase);
- **exponential**: $\\alpha_0 e^{-kt}$, a straight line on a log axis;
- **inverse_time** ($1/t$): $\\alpha_0 / (1 + kt)$, falls fast at first, then very slowly.
"""),
    code("""
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
"""),
    md("""
On a log axis the differences are clearer: exponential decay is a straight line, step decay a
staircase that follows it in jumps, and $1/t$ decay bends: it drops most in the first iterations and
then stays at a relatively high LR for the rest of the run.
"""),
    code("""
plot_schedules(classic, log_y=True)
"""),
    md("""
## 2. One-cycle

fastai's `fit_one_cycle` ramps the LR up from `lr_max/div` to `lr_max` during the first
`pct_start` of training, then anneals it with a cosine to `lr_max/div_final`. The warm-up lets the
network reach a high LR safely (high LR = regularisation and fast progress), the long tail fine-tunes.

**Look for:** the peak at 25% of the iterations, and the end far below the start.
"""),
    code("""
one_cycle = schedule_preview("one_cycle", N_ITER, LR0)
print(f"start {one_cycle[0]:.4f}, peak {one_cycle.max():.4f} at iteration {one_cycle.argmax()}, "
      f"end {one_cycle[-1]:.2e}")
plot_schedules({"one-cycle": one_cycle})
"""),
    md("""
## 3. SGDR: cosine annealing with warm restarts

SGDR anneals the LR along a cosine within a cycle and then jumps back to `lr_max` (a *restart*). The
restart kicks the weights out of a narrow minimum; the ones that settle in wide, flat minima
generalise better. With `cycle_mult=2` each cycle is twice as long as the one before, so with
`cycle_len=1` (epoch) three cycles take 1 + 2 + 4 = 7 epochs.

`sgdr_lrs` gives exactly the per-batch LRs that `fit_sgdr` applies to the head group.
"""),
    code("""
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
"""),
    md("""
**Look for:** each restart sits exactly on an epoch boundary (at 1 and 3 epochs for `cycle_mult=2`),
which is where fastai validates and where a snapshot of the weights can be saved
(`fit_sgdr(..., snapshot_dir=...)`). Every cycle ends near zero: the weights at the end of a cycle
are the well-annealed ones.

## 4. All schedules on one plot
"""),
    code("""
n = len(sgdr)  # 7 epochs x 20 batches
plot_schedules({
    "step": schedule_preview("step", n, LR0),
    "exponential": schedule_preview("exponential", n, LR0),
    "1/t": schedule_preview("inverse_time", n, LR0),
    "one-cycle": schedule_preview("one_cycle", n, LR0),
    "SGDR (1+2+4)": sgdr,
})
"""),
    md("""
## 5. A short training comparison

Now the same pretrained EfficientNet-Lite0 head is trained on the shipped flower sample
(10 classes) with three schedules and the same number of epochs: a constant LR (plain `learn.fit`),
one-cycle, and SGDR. Each run starts from the same seed. In the test suite (`SMALL`) the images are
tiny and the budget is 2 epochs, so the numbers there only show that the code runs; run the notebook
yourself for the real comparison (128 px, 7 epochs).
"""),
    code("""
data = load_data("sample", size=SIZE, bs=BS)
print(f"{data.n_train} training and {data.n_valid} validation images, {len(data.classes)} classes")

# SGDR sets the budget: 1+2+4 = 7 epochs, or 2 cycles of 1 epoch in the test suite
N_CYCLES, CYCLE_MULT = (2, 1) if SMALL else (3, 2)
EPOCHS = sgdr_epochs(N_CYCLES, cycle_len=1, cycle_mult=CYCLE_MULT)


def new_learner():
    \"\"\"A fresh pretrained learner on new DataLoaders: same head and batch order every time.\"\"\"
    dls = load_data("sample", size=SIZE, bs=BS).dls  # load_data seeds its loaders' shuffling
    set_seed(42)  # the same head initialisation
    return create_learner(dls, "tf_efficientnet_lite0", pretrained=True)


runs = {
    "constant": lambda learn: learn.fit(EPOCHS, LR),
    "one-cycle": lambda learn: fit_one_cycle(learn, EPOCHS, LR),
    "SGDR": lambda learn: fit_sgdr(learn, N_CYCLES, cycle_len=1, lr_max=LR, cycle_mult=CYCLE_MULT),
}
rows, applied = [], {}
for name, fit in runs.items():
    learn = new_learner()
    with learn.no_bar(), learn.no_logging():
        fit(learn)
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    rows.append({"schedule": name, "epochs": EPOCHS, "train_loss": train_loss,
                 "valid_loss": valid_loss, "accuracy": acc})
    applied[name] = np.array(learn.recorder.lrs)  # the LR fastai actually used, per batch
pd.DataFrame(rows).set_index("schedule").round(3)
"""),
    md("""
The LRs the runs actually used (recorded by fastai per batch) are the schedules from above:
**look for** the SGDR restarts on the epoch boundaries and one-cycle's warm-up.
"""),
    code("""
plot_schedules(applied)
"""),
    md("""
## Recap

- Step, exponential and $1/t$ decay only ever lower the LR; they differ in *how fast*.
  `schedule_preview` shows any of them per iteration before you train.
- One-cycle warms up to a high LR, then anneals far below the start.
- SGDR restarts a cosine every cycle; `cycle_mult=2` doubles the cycle length (1+2+4 = 7 epochs),
  and every restart falls on an epoch boundary. `sgdr_lrs` previews exactly what `fit_sgdr` applies.
- Compare schedules with the same epochs and seed; the table above is the honest comparison
  (run it at full size to see the real differences).
"""),
]


# ----------------------------------------------------------------------------- 01 LR finder

NB01 = [
    md("""
# The LR range test: finding a learning rate

**What you will learn**

- how the LR range test (Smith 2015) works: train for a few dozen batches while the LR grows
  exponentially, and record the loss at every step;
- how to read the loss-vs-LR plot;
- fastai's four suggestions (`valley`, `slide`, `steep`, `minimum`), fastlesson's `suggestion`, and
  why they differ;
- what happens past divergence, including a run whose loss becomes NaN, and that `find_lr` gives
  you back exactly the weights you had before the test.
"""),
    code(SMALL_SWITCH + """
%matplotlib inline
import numpy as np
import pandas as pd
import torch
from fastai.torch_core import set_seed

from fastlesson import create_learner, find_lr, load_data

SIZE = 32 if SMALL else 128  # px, side of the training images
BS = 16 if SMALL else 32  # images per batch
NUM_IT = 30 if SMALL else 100  # batches in the range test (fastai's default is 100)
"""),
    md("""
## 1. Run the range test

We take the shipped flower sample (10 classes) and a pretrained EfficientNet-Lite0 whose body is
frozen, so only the new head trains, as in step 2 of the recipe. `find_lr` sweeps the LR from
`start_lr` (1e-7) to `end_lr` (10) over `NUM_IT` batches and stops early when the smoothed loss
exceeds 4x its best value (the network has *diverged*).
"""),
    code("""
data = load_data("sample", size=SIZE, bs=BS)
set_seed(42)
learn = create_learner(data.dls, "tf_efficientnet_lite0", pretrained=True)

res = find_lr(learn, num_it=NUM_IT)
print(f"stopped: {res.stop_reason} after {len(res.losses)} batches, at lr={res.lrs[-1]:.2e}")
res.plot()
"""),
    md("""
**What to look for in the plot**

- On the left the LR is too small to change anything: the loss is flat.
- Then the loss falls: this is the useful range. The best LR is *in the steep part of the
  descent*, not at the minimum: at the minimum the LR is already so high that the next step
  makes things worse.
- On the right the loss shoots up: the network diverged and the test stopped (`stop_reason`).
- The grey line is the raw per-batch loss; the blue one is smoothed the way fastai smooths it
  (a debiased moving average). All suggestions are read off the smoothed curve.

## 2. Four suggestions, and the one the recipe uses

fastai offers four ways of reading this curve:

| name | what it picks |
|---|---|
| `minimum` | the LR at the lowest loss, divided by 10 |
| `steep` | where the loss falls fastest (steepest negative slope) |
| `valley` | the middle of the longest stretch of steady descent |
| `slide` | the LR where the slope flattens out, "sliding" back from the divergence |

They look at different features of the curve, so they can land orders of magnitude apart: `steep`
can fire on one noisy drop, `valley` can sit in the first, still-flat points of a noisy curve, and
`slide` wanders on a flat curve. fastlesson's `suggestion` anchors on the most stable feature, the
LR of the lowest smoothed loss `lr_min`: it takes fastai's `valley` and clamps it into
`[lr_min/100, lr_min/3]` (and into the LRs the test actually measured), so it is always below the
point where the loss stops falling and never so far below that training barely moves. On a clean
fine-tuning curve `valley` already sits in that window and is returned unchanged. (In the test
suite's tiny run the curve is mostly noise, so expect odd numbers there.)
"""),
    code("""
lr_min = res.lrs[res.window[0]:res.window[1]][np.argmin(res.smoothed[res.window[0]:res.window[1]])]
table = pd.DataFrame(
    {"lr": {**res.suggestions, "fastlesson suggestion": res.suggestion, "lowest loss (lr_min)": lr_min}})
table["x lr_min"] = table["lr"] / lr_min
table.style.format({"lr": "{:.2e}", "x lr_min": "{:.3f}"})
"""),
    md("""
**Look for:** how far apart the four fastai suggestions are (the `x lr_min` column), and that
fastlesson's suggestion lies between 1/100 and 1/3 of the LR with the lowest loss.

## 3. Past divergence: a run that hits NaN

With `stop_div=False` the test does not stop at divergence and keeps raising the LR. Here we go all
the way to `end_lr=1e8`: the weights blow up, the loss grows by orders of magnitude per batch and
finally becomes non-finite (inf or NaN). Plain fastai's `lr_find` keeps stepping on NaN losses (its
divergence test `nan > 4 * best` is `False`); `find_lr` stops at the first non-finite loss, before
that batch updates the weights, keeps only the finite points, and restores the model, the optimizer
state and the random number generators from copies in memory, even after an error or Ctrl-C.

We copy the weights before the test and compare them afterwards.
"""),
    code("""
before = {k: v.clone() for k, v in learn.model.state_dict().items()}

res_nan = find_lr(learn, start_lr=1e-5, end_lr=1e8, num_it=40 if SMALL else 100, stop_div=False)
print(f"stopped: {res_nan.stop_reason} after {len(res_nan.losses)} finite batches; "
      f"last finite loss {res_nan.losses[-1]:.3g} at lr={res_nan.lrs[-1]:.2e}")

after = learn.model.state_dict()
same = all(torch.equal(before[k], after[k]) for k in before)
print("weights after the test are bit-for-bit the weights before:", same)
assert res_nan.stop_reason == "non_finite" and same
"""),
    md("""
**Look for:** on the left, `find_lr`'s own plot: on a linear axis the blow-up flattens everything
before it, yet the suggestions (read from the finite points, minus the first 10% and the last 5,
as fastai does) still sit where the loss was low; on the right, the
same raw losses on a log axis, climbing over many orders of magnitude before the next batch's loss
stops being a number. The suggestions come from the finite part only, so they stay usable, but a
test that diverges this hard means `end_lr` is far too high.
"""),
    code("""
import matplotlib.pyplot as plt

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
res_nan.plot(ax=ax1)
ax2.loglog(res_nan.lrs, res_nan.losses, ".-", label="loss (raw, finite batches)")
ax2.axvline(res_nan.lrs[-1], color="C3", ls=":", label="next batch: non-finite loss, test stopped")
ax2.set_xlabel("learning rate")
ax2.set_ylabel("train loss (log scale)")
ax2.legend()
plt.show()
"""),
    md("""
## Recap

- The range test trains a few dozen batches at exponentially growing LRs; pick an LR where the
  smoothed loss is still clearly falling, below the minimum.
- fastai's `valley`, `slide`, `steep` and `minimum` read different features of the curve and can
  disagree by orders of magnitude; fastlesson's `suggestion` is `valley` clamped to
  `[lr_min/100, lr_min/3]`.
- `find_lr` stops at divergence (`stop_reason="diverged"`) or at the first NaN/inf loss
  (`"non_finite"`), never trains on a NaN, and always puts the weights back exactly as they were.
"""),
]


# ----------------------------------------------------------------------------- 03 transfer learning

NB03 = [
    md("""
# Transfer learning: layer groups, freezing, discriminative LRs, precomputed activations

**What you will learn**

- how a pretrained network is split into *layer groups* (early body, late body, head);
- what `freeze` and `unfreeze` change, and why BatchNorm layers stay trainable;
- discriminative learning rates: each earlier group trains 3x-10x slower than the next;
- precomputed activations: run the frozen body once, cache its outputs, and train the head on the
  cache, with the time per epoch measured with and without the cache side by side.
"""),
    code(SMALL_SWITCH + """
%matplotlib inline
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from fastai.torch_core import set_seed

from fastlesson import (
    create_learner, fit_one_cycle, freeze, load_data, lr_groups, n_groups, precompute_head, resolve_lrs,
    unfreeze,
)

SIZE = 32 if SMALL else 128  # px, side of the training images
BS = 32  # images per batch
LR = 1e-2  # head LR (Adam)
EPOCHS = 1 if SMALL else 3  # epochs per training run below
SCRATCH = Path(tempfile.mkdtemp(prefix="fastlesson-nb03-"))  # the activation cache goes here
"""),
    md("""
## 1. Layer groups

`create_learner` builds `nn.Sequential(body, head)`: the ImageNet-pretrained EfficientNet-Lite0 body
and a new head for our 10 flower classes. Its splitter cuts the model into three *layer groups*,
which become three parameter groups of the optimizer, each with its own learning rate: the early
body (generic edges and textures), the late body (more specific shapes) and the head (random at
first).
"""),
    code("""
data = load_data("sample", size=SIZE, bs=BS)
set_seed(42)
learn = create_learner(data.dls, "tf_efficientnet_lite0", pretrained=True)
print("layer groups:", n_groups(learn))


def group_table(learn):
    \"\"\"Parameters per layer group, and how many of them will be trained.\"\"\"
    rows = []
    for name, ps in zip(["early body", "late body", "head"], learn.opt.param_lists):
        rows.append({"group": name, "parameters": sum(p.numel() for p in ps),
                     "trainable": sum(p.numel() for p in ps if p.requires_grad)})
    return pd.DataFrame(rows).set_index("group")


group_table(learn)
"""),
    md("""
A pretrained learner starts **frozen**: only the head is trained, so the random head cannot wreck the
pretrained features with large gradients. **Look for** the small number of trainable parameters in
the two body groups: those are the BatchNorm weights, which fastai keeps trainable (`train_bn=True`)
because the statistics of our images differ from ImageNet's.

## 2. Freeze and unfreeze

`freeze` and `unfreeze` return the number of trainable groups (and, unlike fastai's, refuse a
one-group model where they would silently do nothing).
"""),
    code("""
unfreeze(learn)
display(group_table(learn))
freeze(learn)
group_table(learn)
"""),
    md("""
## 3. Discriminative learning rates

After the head is trained we unfreeze and fine-tune everything, but the early layers already hold
good generic features and should move less. `lr_groups(learn, lr_max, factor)` gives the head
`lr_max` and every earlier group `factor` times less; the lesson uses factors of 3 to 10. A fastai
`slice(lo, hi)` spreads the LRs geometrically instead (`resolve_lrs` shows what it means for a
model).
"""),
    code("""
choices = {
    "lr_groups(1e-3, factor=3)": lr_groups(learn, 1e-3, factor=3),
    "lr_groups(1e-3, factor=10)": lr_groups(learn, 1e-3, factor=10),
    "slice(1e-5, 1e-3)": resolve_lrs(learn, slice(1e-5, 1e-3)),
}
table = pd.DataFrame(choices, index=["early body", "late body", "head"]).T
display(table.style.format("{:.1e}"))

fig, ax = plt.subplots(figsize=(7, 3))
for i, (name, lrs) in enumerate(choices.items()):
    ax.bar(np.arange(3) + 0.27 * (i - 1), lrs, width=0.27, label=name)
ax.set_xticks(range(3), ["early body", "late body", "head"])
ax.set_yscale("log")
ax.set_ylabel("learning rate")
ax.legend(fontsize="small")
plt.show()
"""),
    md("""
**Look for:** on the log axis each step between groups is the same factor; the head always gets the
largest LR.

## 4. Train the head, then everything

The recipe in two moves: train the frozen model's head, then unfreeze and train all groups with
discriminative LRs (head at `LR/10`, each earlier group 3x lower).
"""),
    code("""
results = []
with learn.no_bar(), learn.no_logging():
    fit_one_cycle(learn, EPOCHS, LR)
results.append(("head only (frozen)", *learn.recorder.values[-1]))

unfreeze(learn)
lrs = lr_groups(learn, LR / 10, factor=3)
with learn.no_bar(), learn.no_logging():
    fit_one_cycle(learn, EPOCHS, lrs)
results.append(("all groups, LRs " + " / ".join(f"{lr:.1e}" for lr in lrs), *learn.recorder.values[-1]))
pd.DataFrame(results, columns=["stage", "train_loss", "valid_loss", "accuracy"]).set_index("stage").round(3)
"""),
    md("""
## 5. Precomputed activations

While the body is frozen its output for an image never changes, except through data augmentation.
So instead of running the whole network every epoch, `precompute_head` runs the body **once** over
the training and validation images (no augmentation, body in eval mode), caches the activations (in
memory and, with `cache_dir`, on disk as safetensors) and trains only the head on them. A second
call with the same model and data finds the cache and skips the body entirely.

We time the same number of head-only epochs three ways, each from the same fresh learner:
the normal way (body forward pass every batch, with augmentation), with the cache being built, and
with the cache already there.
"""),
    code("""
def fresh_learner():
    \"\"\"A frozen pretrained learner on new DataLoaders: same head and batch order every time.\"\"\"
    dls = load_data("sample", size=SIZE, bs=BS).dls  # load_data seeds its loaders' shuffling
    set_seed(42)  # the same head initialisation
    return create_learner(dls, "tf_efficientnet_lite0", pretrained=True)


learn = fresh_learner()
t0 = time.perf_counter()
with learn.no_bar(), learn.no_logging():
    fit_one_cycle(learn, EPOCHS, LR)
plain_s = time.perf_counter() - t0
rows = [{"method": "full forward pass every epoch", "one-off cache (s)": 0.0,
         "s per epoch": plain_s / EPOCHS, "accuracy": float(learn.recorder.values[-1][2])}]

for label in ("precomputed: building the cache", "precomputed: cache already there"):
    learn = fresh_learner()
    with learn.no_bar(), learn.no_logging():
        r = precompute_head(learn, EPOCHS, LR, cache_dir=SCRATCH)
    rows.append({"method": f"{label} (hit={r.cache_hit})", "one-off cache (s)": r.seconds_cache,
                 "s per epoch": r.seconds_per_epoch, "accuracy": r.accuracy})

timing = pd.DataFrame(rows).set_index("method")
timing["speed-up per epoch"] = timing["s per epoch"].iloc[0] / timing["s per epoch"]
print(f"cached activations: {r.feature_shape} per image, {r.n_train} train + {r.n_valid} valid images")
timing.round(3)
"""),
    md("""
**Look for:** the *s per epoch* column. With the cache an epoch only runs the small head, so it is
many times faster; the body's one pass is paid once (*one-off cache*), and not at all when the cache
is already there. The price: no data augmentation while training on the cache, which is why the
recipe follows this step with a few epochs of normal, augmented head training.
"""),
    md("""
## Recap

- A pretrained learner has layer groups (early body, late body, head) and starts frozen: only the
  head (plus BatchNorm) trains.
- `unfreeze` then lets every group train; give earlier groups 3x-10x lower LRs with `lr_groups` (or
  a `slice`).
- `precompute_head` runs the frozen body once and trains the head on cached activations: the same
  head training at a fraction of the time per epoch, without augmentation.
"""),
]


# ----------------------------------------------------------------------------- 04 optimizers

NB04 = [
    md("""
# Optimizers: SGD, Adam, RAdam, Lookahead(RAdam) and ranger

**What you will learn**

- how to pick an optimizer by name with `opt_func(name)` and hand it to a learner;
- how `Lookahead` wraps *any* PyTorch optimizer (here `torch.optim.RAdam`) and still follows fastai's
  schedules through `OptimWrapper`;
- how the five optimizers compare on the same data, model, schedule and epoch budget: loss curves on
  one plot and a results table.
"""),
    code(SMALL_SWITCH + """
%matplotlib inline
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.optimizer import OptimWrapper
from fastai.torch_core import set_seed

from fastlesson import OPTIMIZERS, Lookahead, create_learner, fit_one_cycle, load_data, lookahead, opt_func

SIZE = 32 if SMALL else 128  # px, side of the training images
BS = 32  # images per batch
EPOCHS = 1 if SMALL else 5  # the same budget for every optimizer
# Peak one-cycle LR per optimizer: SGD needs a larger step than the adaptive ones (per-parameter scaling)
LRS = {"sgd": 1e-1, "adam": 1e-2, "radam": 1e-2, "lookahead-radam": 1e-2, "ranger": 1e-2}
"""),
    md("""
## 1. The optimizers

| name | what it is |
|---|---|
| `sgd` | SGD with momentum 0.9 (fastai's `SGD`) |
| `adam` | Adam: per-parameter step sizes from running averages of the gradient and its square |
| `radam` | Rectified Adam: Adam with an automatic warm-up while the variance estimate is unreliable |
| `lookahead-radam` | `torch.optim.RAdam` wrapped in `Lookahead(k=6, alpha=0.5)`, through fastai's `OptimWrapper` |
| `ranger` | fastai's ranger: RAdam + Lookahead, written as a fastai optimizer |

Lookahead keeps a slow copy of the weights; every `k` steps of the inner optimizer it moves the slow
weights `alpha` of the way towards the fast ones and restarts the fast weights from there. It
smooths the path and makes the result less sensitive to the LR.

`opt_func(name)` returns what fastai's `Learner(..., opt_func=...)` expects; `create_learner` also
takes the name directly. The Lookahead version is an `OptimWrapper` around our `Lookahead`, which
shares its `param_groups` with the inner RAdam, so when a fastai schedule sets the LR (or momentum)
the optimizer that actually steps sees it:
"""),
    code("""
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

# the same thing for any other torch optimizer, e.g. AdamW with its own keyword arguments
adamw_la = lookahead(torch.optim.AdamW, k=5, alpha=0.5)
"""),
    md("""
## 2. Same data, same budget

Each optimizer trains the head of the same pretrained EfficientNet-Lite0 (same seed, so the same
initial head and batch order) for `EPOCHS` epochs of one-cycle at its LR from `LRS`. fastai's
recorder keeps the smoothed training loss of every batch and the validation loss of every epoch.
"""),
    code("""
curves, rows = {}, []
for name in OPTIMIZERS:
    dls = load_data("sample", size=SIZE, bs=BS).dls  # fresh loaders: the same batch order every run
    set_seed(42)  # the same head initialisation
    learn = create_learner(dls, "tf_efficientnet_lite0", pretrained=True, opt_func=opt_func(name))
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        fit_one_cycle(learn, EPOCHS, LRS[name])
    seconds = time.perf_counter() - t0
    curves[name] = (np.array(learn.recorder.losses), np.array([v[1] for v in learn.recorder.values]))
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    rows.append({"optimizer": name, "lr": LRS[name], "epochs": EPOCHS, "train_loss": train_loss,
                 "valid_loss": valid_loss, "accuracy": acc, "seconds": seconds})
"""),
    code("""
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
"""),
    md("""
**Look for:** how fast each training-loss curve falls in the first iterations (the adaptive methods
usually lead early; RAdam's built-in warm-up starts a little slower than Adam: for its first few
steps it has no reliable variance estimate and takes plain momentum steps, and Lookahead only syncs
every `k=6` steps, so `radam`, `lookahead-radam` and `ranger` coincide at first), whether the curves
are smooth or noisy (Lookahead and ranger are smoother), and in the table whether a faster start
ends in a better validation loss. In the test suite (`SMALL`) the run is far too short to rank
anything: run the notebook yourself for the real comparison, and repeat it with other seeds before
drawing conclusions.
"""),
    md("""
## Recap

- `opt_func(name)` gives fastai optimizers by name: `sgd`, `adam`, `radam`, `lookahead-radam`,
  `ranger`; `create_learner(..., opt_func=name)` takes the name directly.
- `lookahead(torch_optimizer_class, k, alpha)` wraps any PyTorch optimizer; through `OptimWrapper`,
  fastai's one-cycle and discriminative LRs reach the optimizer that actually steps.
- Compare optimizers with the same data, model, seed, schedule and epochs, each at a sensible LR.
"""),
]


# ----------------------------------------------------------------------------- 00 quickstart

NB00 = [
    md("""
# Quickstart: the whole recipe in one call

**What you will learn**

- how to run the eight-step lesson-2 recipe on the flower sample that ships with fastlesson
  (no download, no GPU needed) with one call, `run_recipe(RecipeConfig(...))`;
- what the run writes: a report, its key plots, the metrics, and a *safe* model bundle;
- how to load that bundle and predict the class of an image.

The eight steps themselves are walked through one cell at a time in `05_recipe_flowers.ipynb`.
"""),
    code(SMALL_SWITCH + """
import tempfile
from pathlib import Path

from IPython.display import Image, Markdown, display

from fastlesson import sample_path
from fastlesson.export import load_model
from fastlesson.recipe import RecipeConfig, run_recipe

# Outputs: a throw-away folder in the test suite, runs/quickstart (git-ignored) otherwise
OUT = Path(tempfile.mkdtemp(prefix="fastlesson-nb00-")) if SMALL else Path("../runs/quickstart")
# The test suite's tiny run: 32 px images, one epoch per training step, the shortest LR range tests
TINY = dict(size=32, bs=32, epochs_max=1, precompute_epochs=1, head_cycles=1, lr_find_iters=24,
            top_losses=4, tta=False)
"""),
    md("""
## 1. Run the recipe

`RecipeConfig` holds every setting with its default (see `RecipeConfig?`); `data="sample"` is the
shipped sample of 10 Oxford flower classes (16 training and 6 validation images each). The run
prints each step with a one-line result. On a laptop CPU the full-size run takes a few minutes.
"""),
    code("""
cfg = RecipeConfig(data="sample", out=str(OUT), **(TINY if SMALL else {}))
result = run_recipe(cfg)
print(f"validation accuracy {result.accuracy:.1%}, outputs in {result.out}")
"""),
    md("""
## 2. The report

Everything the run did is in `report.md` in the output folder, next to `config.json` (the effective
settings), `metrics.json`, `history.csv` and the plots. Here is its summary and the table of steps:
"""),
    code("""
print(sorted(p.name for p in result.out.iterdir()))
report = result.files["report"].read_text()
Markdown(report.split("## Plots")[0])
"""),
    md("""
### The LR range test (step 2)

Loss against learning rate while the LR grows every batch; the dashed line is the LR the recipe
picked. **Look for** a flat start, a falling middle, and the blow-up at the end; the pick should be
on the falling part, well before the minimum (`01_lr_finder.ipynb` explains why).
"""),
    code("""
Image(filename=str(result.files["lr_find_head"]))
"""),
    md("""
### The learning rate of every batch

**Look for** the shape of each step: one-cycle on the cached activations (step 3), SGDR cycles of
one epoch for the head (step 4), then SGDR with doubling cycles on the unfrozen network (step 8),
where the early layer groups run at lower LRs (discriminative LRs).
"""),
    code("""
Image(filename=str(result.files["lr_schedule"]))
"""),
    md("""
### Losses per epoch

**Look for** the validation loss falling with the training loss; when it stops falling while the
training loss keeps going down, the model starts to overfit, and step 8 stops there and keeps the
best weights.
"""),
    code("""
Image(filename=str(result.files["losses"]))
"""),
    md("""
### Confusion matrix and top losses

**Look for** the diagonal (correct predictions) and for pairs of classes that are confused with each
other; the top losses are the validation images the model got most confidently wrong, often
mislabelled or unusual pictures.
"""),
    code("""
display(Image(filename=str(result.files["confusion"])))
if "top_losses" in result.files:
    display(Image(filename=str(result.files["top_losses"])))
"""),
    md("""
## 3. Predict with the safe bundle

The run exported the model twice: fastai's `export.pkl` (a pickle: loading it runs code from the
file) and a **safe bundle**, `model.safetensors` (weights only) plus `model.json` (architecture,
classes, preprocessing). `load_model` loads the bundle without unpickling anything, and refuses a
pickle unless you say you trust it.
"""),
    code("""
predictor = load_model(result.out)  # the folder holds the bundle
print(predictor)

try:
    load_model(result.out / "export.pkl")
except ValueError as err:
    print("\\nload_model refuses the pickle:", err)
"""),
    code("""
import json

folder = sorted((sample_path() / "valid").iterdir())[0]  # one class folder of the sample
image = sorted(folder.glob("*.jpg"))[0]
true_name = json.loads((sample_path() / "cat_to_name.json").read_text())[folder.name]

pred = predictor.predict(image)[0]
print(f"true class: {true_name}\\npredicted:  {pred.label} ({pred.prob:.1%})")
print("top 5:", ", ".join(f"{label} {p:.1%}" for label, p in pred.top5))
Image(filename=str(image))
"""),
    md("""
## Recap

- `run_recipe(RecipeConfig(data=...))` runs all eight steps and writes a report, plots, metrics
  and the model; `data` can also be `"flowers"`, `"cifar10"` or a folder of your own images.
- The report's plots tell you whether the LR was sensible, what schedule ran, and when the model
  started to overfit.
- `load_model(folder).predict(image)` uses the safe bundle (safetensors + JSON): no pickle.
  The same is available on the command line: `python scripts/recipe.py` and `python scripts/predict.py`.
"""),
]

# ----------------------------------------------------------------------------- 05 recipe on flowers

NB05 = [
    md("""
# The eight-step recipe on flowers, one cell at a time

**What you will learn**

- the fast.ai lesson-2 recipe for a state-of-the-art image classifier, step by step, with the
  fastlesson function behind each step, so you can change any one of them;
- what each step prints and plots, and what to look for;
- how to go from the shipped flower sample to the full Oxford 102 flowers data set by changing one
  variable.

`00_quickstart.ipynb` runs the same eight steps in one call (`run_recipe`).
"""),
    code(SMALL_SWITCH + """
%matplotlib inline
import pandas as pd
from fastai.callback.training import BnFreeze, bn_types
from fastai.torch_core import set_seed

from fastlesson import (
    create_learner, find_lr, fit_sgdr, freeze_to, load_data, lr_groups, n_groups, precompute_head,
    precompute_learner,
)
from fastlesson.recipe import fit_until_overfit
from fastlesson.report import confusion_matrix, most_confused, plot_confusion

# False: the flower sample shipped with fastlesson (10 classes, offline).
# True: the full Oxford 102 flowers (102 classes, ~8k images, a ~330 MB download on first use).
FULL_FLOWERS = False

ARCH = "tf_efficientnet_lite0"  # its ImageNet weights ship with a pip package: works offline
SIZE = 32 if SMALL else 160  # px, side of the square training images
BS = 32  # images per batch
NUM_IT = 24 if SMALL else 100  # batches per LR range test
PRECOMPUTE_EPOCHS = 1 if SMALL else 8  # step 3 (the lesson: 1-2; on the cache an epoch costs seconds)
HEAD_CYCLES = 1 if SMALL else 2  # step 4: SGDR cycles of one epoch (the lesson: 2-3)
FREEZE_TO = 1  # step 5: unfreeze layer groups from this one on (0: all; 1 keeps the early body frozen)
LR_FACTOR = 10.0  # step 6: each earlier layer group trains this many times slower (the lesson: 3-10)
EPOCHS_MAX = 1 if SMALL else 7  # step 8: at most 1 + 2 + 4 epochs
set_seed(42)
"""),
    md("""
## Step 1. Data with augmentation, and a pretrained backbone

`load_data` builds fastai DataLoaders with random crops, flips, rotations and lighting changes for
training (none for validation) and reports anything it had to skip. `create_learner` puts a new
head for our classes on an ImageNet-pretrained body and freezes the body.

**Look for** in the batch below: the same kind of flower photographed differently; augmentation
makes each epoch show slightly different versions of every image.
"""),
    code("""
data = load_data("flowers" if FULL_FLOWERS else "sample", size=SIZE, bs=BS)
print(f"{data.source}: {len(data.classes)} classes, {data.n_train} train / {data.n_valid} valid "
      f"images (validation split: {data.split}); {len(data.skipped)} skipped")
learn = create_learner(data.dls, ARCH, pretrained=True)
print(f"{ARCH}: {n_groups(learn)} layer groups, body frozen")
data.dls.show_batch(max_n=8, nrows=2, figsize=(10, 5))
"""),
    md("""
## Step 2. LR range test

Train a few dozen batches with the LR growing exponentially, and pick the highest LR at which the
loss is still clearly falling (`01_lr_finder.ipynb` has the details). The body is frozen, so its
output for each image is fixed: `precompute_learner` runs the body once over the (un-augmented)
training and validation images and gives a learner for the head alone on those cached activations.
The range test on it takes seconds instead of a hundred full forward and backward passes (fastai
v0.7 ran `lr_find` on precomputed activations the same way).
"""),
    code("""
head_learn = precompute_learner(learn)
print(f"body run once in {head_learn.precompute.seconds:.1f} s")
res = find_lr(head_learn, num_it=NUM_IT)
lr_head = res.suggestion
print(f"{res.stop_reason} after {len(res.losses)} batches; head LR = {lr_head:.2e}")
res.plot()
"""),
    md("""
## Step 3. Train the head on precomputed activations

Train only the head on the cached activations. An epoch here costs a few percent of a real one, so
the recipe trains more of them than the lesson's 1-2 (8 by default: on flowers102-small, 2 epochs
reach ~73% and 8 reach ~85%). This is fast, but without augmentation.
"""),
    code("""
pc = precompute_head(learn, PRECOMPUTE_EPOCHS, lr_max=lr_head, head_learn=head_learn)
print(f"{pc.epochs} head epoch(s) in {pc.seconds_train:.1f} s; "
      f"valid loss {pc.valid_loss:.3f}, accuracy {pc.accuracy:.1%}")
"""),
    md("""
## Step 4. Train the head with augmentation: SGDR, `cycle_len=1`

Now a few epochs through the whole (frozen) network, with augmentation, each epoch one cosine cycle
that restarts at the head LR. Here fastai's frozen training also trains the body's BatchNorm layers
(`train_bn`), whose statistics then drift towards the augmented batches; `run_recipe` keeps them
frozen in this step (eval mode, no gradient), so the head trained in step 3 is not undone. Below,
the body's BatchNorm layers get no gradient, and fastai's `BnFreeze` callback keeps every BatchNorm
layer without gradient in eval mode.
"""),
    code("""
bn_params = [p for m in learn.model[0].modules() if isinstance(m, bn_types) for p in m.parameters()]
for p in bn_params:
    p.requires_grad_(False)  # the body's BatchNorm: ImageNet weights and statistics, as precompute saw them
cycle_ends = fit_sgdr(learn, n_cycles=HEAD_CYCLES, cycle_len=1, cycle_mult=1, lr_max=lr_head,
                      cbs=[BnFreeze()])
print("cycles ended after epochs", [e + 1 for e in cycle_ends])
"""),
    md("""
## Step 5. Unfreeze

The lesson unfreezes every layer. On a small data set two changes help, and `run_recipe` makes
both by default: the early body (stem and first stages, layer group 0) stays frozen (its backward
pass is the costly one on a CPU, and its generic edge and texture detectors need no change), and the
body's BatchNorm layers keep their ImageNet statistics (fastai v0.7's `bn_freeze(True)`): trained,
they follow the small augmented batches. Set `FREEZE_TO = 0` to unfreeze everything.
"""),
    code("""
freeze_to(learn, FREEZE_TO)
for p in bn_params:
    p.requires_grad_(False)  # freeze_to made them trainable again (fastai's train_bn)
"""),
    md("""
## Step 6. Discriminative learning rates

The early layers already detect generic edges and textures and should change least: each layer
group gets `LR_FACTOR` times less than the next. Here we only fix the *ratios*; step 7 finds the
overall level.
"""),
    code("""
ratios = lr_groups(learn, 1.0, factor=LR_FACTOR)
print("LR ratios, early body -> head:", " : ".join(f"{r:.3g}" for r in ratios))
"""),
    md("""
## Step 7. LR range test again, on the unfrozen model

The sweep moves all groups together and keeps the ratios from step 6. The head is already trained,
so the loss starts low and the curve looks different from step 2: flat before it rises, so its
minimum can land on noise. The recipe keeps the LR between a tenth of the head's LR from step 2 and
that LR (higher would undo the head training). The early group is frozen: its LR is not used.
"""),
    code("""
res_full = find_lr(learn, num_it=NUM_IT, lr_ratios=ratios.tolist(), cbs=[BnFreeze()])
lr_top = min(max(res_full.suggestion, lr_head / 10), lr_head)
lrs = ratios * lr_top
print(f"suggested {res_full.suggestion:.2e}, using {lr_top:.2e}; group LRs",
      " / ".join(f"{lr:.1e}" for lr in lrs))
res_full.plot()
"""),
    md("""
## Step 8. Train the full network: SGDR with `cycle_mult=2` until it overfits

Cycles of 1, 2, 4, ... epochs, as long as the validation loss keeps improving; the first cycle that
brings no improvement means the model has started to overfit, so training stops and the best
weights seen are restored.
"""),
    code("""
stop = fit_until_overfit(learn, lrs, EPOCHS_MAX, cycle_len=1, cycle_mult=2, cbs=[BnFreeze()])
stop
"""),
    md("""
## Evaluate

**Look for** the diagonal of the confusion matrix, and which flowers are mistaken for which: the
pairs are usually flowers that really do look alike. With the full 102 classes the matrix is too
big to read, so we list the most-confused pairs instead.
"""),
    code("""
valid_loss, accuracy = learn.validate()
print(f"validation loss {valid_loss:.3f}, accuracy {accuracy:.1%}")
preds, targs = learn.get_preds()
cm = confusion_matrix(targs.numpy(), preds.argmax(1).numpy(), len(data.classes))
display(pd.DataFrame(most_confused(cm, data.classes, k=10), columns=["actual", "predicted", "count"]))
plot_confusion(cm, data.classes) if len(data.classes) <= 20 else None
"""),
    md("""
## Recap

1. `load_data` + `create_learner`: augmented data, pretrained body, frozen.
2. `precompute_learner` + `find_lr`: the body runs once; on its cached activations, the highest LR
   where the head's loss still clearly falls.
3. `precompute_head`: the head on the cached activations (epochs there cost seconds).
4. `fit_sgdr(cycle_len=1)`: the head with augmentation, 2-3 one-epoch cycles.
5. `freeze_to(1)` (or `unfreeze`), the body's BatchNorm kept frozen.
6. `lr_groups(factor=3..10)`: discriminative LRs.
7. `find_lr(lr_ratios=...)` again on the unfrozen model.
8. `fit_until_overfit`: SGDR with `cycle_mult=2` until validation loss stops improving, keeping the
   best weights.

Set `FULL_FLOWERS = True` at the top and re-run for the full Oxford flowers data set.
"""),
]

# ----------------------------------------------------------------------------- 06 scrape, train, export

NB06 = [
    md("""
# Your own data set: scrape, train, export, predict

**What you will learn**

- how to build a data set of your own classes (here *daisy*, *horse* and *mango*) from an image
  search, with every download checked, de-duplicated and split into train/valid;
- how to read the manifest that records what happened to every URL;
- how to train on the result, export a safe model bundle, load it and predict.

This machine may have no internet. The notebook first tries the real image search with a short
timeout; if that fails (or in the test suite, which never touches the network) it says so and builds a small local stand-in data set (drawn pictures
served from this machine over HTTP), so every following step runs the same way.
"""),
    code(SMALL_SWITCH + """
%matplotlib inline
import functools
import http.server
import json
import tempfile
import threading
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown
from PIL import Image, ImageDraw, ImageFilter

from fastlesson import ScrapeConfig, create_learner, fit_one_cycle, load_data, scrape_dataset
from fastlesson.export import export_bundle, load_model

CLASSES = ["daisy", "horse", "mango"]
N_IMAGES = 12 if SMALL else 100  # search results asked for, per class
SIZE = 32 if SMALL else 128  # px, training image side
BS = 16  # images per batch
EPOCHS = 1 if SMALL else 4
OUT = Path(tempfile.mkdtemp(prefix="fastlesson-nb06-")) if SMALL else Path("../runs/scrape_demo")
"""),
    md("""
## 1. Search and download

`scrape_dataset` searches for each class, downloads every hit with timeouts, a size cap and retries,
checks that the bytes are really an image (and not a decompression bomb, or too small), converts
it to a normalised JPEG, drops exact and near duplicates (perceptual hash), splits the rest into
`train/` and `valid/` and writes `manifest.json`. Here the search gets one attempt with a short
timeout, so an offline machine finds out quickly.
"""),
    code("""
online = False
if SMALL:  # the test suite runs this notebook: it never touches the internet
    print("SMALL mode (test suite): skipping the web search.")
else:
    web_cfg = ScrapeConfig(classes=CLASSES, dest=str(OUT / "web"), n_images=N_IMAGES, timeout=5.0,
                           max_seconds=20.0, retries=0, search_retries=0, min_per_class=5, progress=False)
    result = scrape_dataset(web_cfg)
    failed = [q for q in result.queries if q["status"] != "ok"]
    online = not failed and not result.short_classes
if online:
    print(f"image search worked: {sum(len(result.kept(c)) for c in result.classes)} images kept")
elif not SMALL:
    print("No usable image search here (no network?):",
          failed[0]["error"][:150] if failed else f"too few images {result.short_classes}")
if not online:
    print("-> falling back to a local stand-in data set served from this machine.")
"""),
    md("""
### The offline fallback

Without the internet we make the images ourselves: simple drawings of daisies, horses and mangoes
with random sizes, positions and colours, written to a folder and served over HTTP on the loopback
interface. We add three bad URLs on purpose, to see how the scraper records them: a missing file
(HTTP 404), a text file that is not an image, and an exact copy of an image. The URL list goes to
`scrape_dataset` through `from_urls`, exactly what `scripts/scrape.py --from-urls FILE` does.
"""),
    code("""
def draw(cls, rng, px=128):
    \"\"\"A random picture of `cls` (a stand-in for a photo).\"\"\"
    bg = {"daisy": (60, 140, 50), "horse": (150, 200, 240), "mango": (210, 190, 150)}[cls]
    im = Image.new("RGB", (px, px), tuple(int(c + rng.integers(-40, 40)) for c in bg))
    d = ImageDraw.Draw(im)
    x, y = (int(v) for v in rng.integers(35, px - 35, size=2))
    r = int(rng.integers(14, 30))
    if cls == "daisy":
        for a in np.linspace(0, 2 * np.pi, int(rng.integers(8, 14)), endpoint=False):
            cx, cy = x + r * np.cos(a), y + r * np.sin(a)
            d.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=(250, 250, 245))
        d.ellipse([x - r / 2, y - r / 2, x + r / 2, y + r / 2], fill=(240, 200, 20))
    elif cls == "horse":
        d.rectangle([0, px * 2 // 3, px, px], fill=(70, 150, 60))  # grass
        brown = tuple(int(c) for c in rng.integers([90, 50, 20], [160, 100, 60]))
        d.ellipse([x - r, y - r / 2, x + r, y + r / 2], fill=brown)  # body
        d.ellipse([x + r - 4, y - r, x + r + 10, y - r / 3], fill=brown)  # head
        for lx in (x - r + 4, x - r / 3, x + r / 3, x + r - 6):
            d.rectangle([lx, y + r / 3, lx + 4, y + r * 1.3], fill=brown)  # legs
    else:
        colour = tuple(int(c) for c in rng.integers([220, 110, 0], [255, 200, 60]))
        d.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=colour)
        d.ellipse([x + r - 6, y - r * 0.7, x + r + 2, y - r * 0.4], fill=(60, 130, 40))  # leaf
    return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))


def serve(folder):
    \"\"\"Serve `folder` over HTTP on 127.0.0.1 from a background thread; returns the base URL.\"\"\"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no request log in the notebook
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}"


if not online:
    fixture, rng = OUT / "fixture", np.random.default_rng(0)
    per_class = 15 if SMALL else 40
    for cls in CLASSES:
        (fixture / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(cls, rng).save(fixture / cls / f"{i}.jpg", quality=90)
    (fixture / "notes.txt").write_text("not an image")
    base = serve(fixture)
    urls = {cls: [f"{base}/{cls}/{i}.jpg" for i in range(per_class)] for cls in CLASSES}
    urls["daisy"] += [f"{base}/daisy/0.jpg?copy", f"{base}/daisy/missing.jpg", f"{base}/notes.txt"]
    url_file = OUT / "urls.json"
    url_file.write_text(json.dumps(urls, indent=1))
    cfg = ScrapeConfig(classes=CLASSES, dest=str(OUT / "offline"), from_urls=str(url_file),
                       retries=0, timeout=5.0, min_per_class=5, progress=False)
    result = scrape_dataset(cfg)
dest = result.dest
print("data set in", dest)
"""),
    md("""
## 2. The manifest

`result.summary_table()` is what `scripts/scrape.py` prints: per class, how many URLs were found,
kept (and split into train/valid) and rejected, by reason. `manifest.json` holds one entry per URL:
its status, the reason for a rejection, the image size, its hashes and where the file went.

**Look for** the rejected ones: nothing is dropped silently.
"""),
    code("""
Markdown(result.summary_table())
"""),
    code("""
manifest = json.loads((dest / "manifest.json").read_text())
entries = pd.DataFrame(manifest["entries"])
cols = ["class", "status", "reason", "split", "width", "height", "path"]
display(entries[entries.status != "ok"][cols])
entries[entries.status == "ok"][cols].head()
"""),
    md("""
## 3. Train

The scraped folder has the usual `train/<class>/` and `valid/<class>/` layout, so `load_data` reads
it like any other data set. We train the head of a pretrained EfficientNet-Lite0 with one-cycle.
"""),
    code("""
data = load_data(dest, size=SIZE, bs=BS)
print(f"{data.classes}: {data.n_train} train / {data.n_valid} valid images")
data.dls.show_batch(max_n=8, nrows=2, figsize=(10, 5))
"""),
    code("""
learn = create_learner(data.dls, "tf_efficientnet_lite0", pretrained=True)
fit_one_cycle(learn, EPOCHS, 1e-2)
"""),
    md("""
## 4. Export, load, predict

`export_bundle` writes the safe bundle: `model.safetensors` (tensors only, nothing executable) and
`model.json` (architecture, classes and the exact preprocessing). `load_model` rebuilds the model
from these two files without unpickling anything; `predict` takes image paths or PIL images.
"""),
    code("""
bundle = OUT / "model"
export_bundle(learn, bundle)
print(sorted(p.name for p in bundle.iterdir()))
predictor = load_model(bundle)
print(predictor)
"""),
    code("""
valid_images = [p for c in data.classes for p in sorted((dest / "valid" / c).glob("*.jpg"))[:2]]
preds = predictor.predict(valid_images)
fig, axes = plt.subplots(1, len(valid_images), figsize=(2.2 * len(valid_images), 2.6))
for ax, path, pred in zip(np.atleast_1d(axes), valid_images, preds):
    ax.imshow(Image.open(path))
    ax.set_title(f"{path.parent.name}\\n-> {pred.label} {pred.prob:.0%}", fontsize=9)
    ax.axis("off")
plt.show()
"""),
    md("""
**Look for:** the folder name (the true class) above each prediction. In the test suite's tiny run
the model has seen each image for one epoch at 32 px, so expect mistakes.
"""),
    md("""
## Recap

- `scrape_dataset(ScrapeConfig(classes=[...]))` searches, downloads, verifies, de-duplicates and
  splits; `from_urls` takes your own URL list instead of a search. Every URL ends with a status in
  `manifest.json`.
- The result is a normal `train/` + `valid/` folder: `load_data(folder)` and train as usual.
- `export_bundle` + `load_model(...).predict(...)`: a model you can share and load safely.
  On the command line: `scripts/scrape.py`, `scripts/recipe.py --data FOLDER`, `scripts/predict.py`.
"""),
]

NOTEBOOKS = {
    "00_quickstart": NB00,
    "01_lr_finder": NB01,
    "02_lr_schedules": NB02,
    "03_transfer_learning": NB03,
    "04_optimizers": NB04,
    "05_recipe_flowers": NB05,
    "06_scrape_train_export": NB06,
}


def build(name: str) -> Path:
    """Write nbs/<name>.ipynb from its cells; returns the path."""
    nb = new_notebook(cells=NOTEBOOKS[name])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating gives no spurious diff
    nbformat.validate(nb)
    path = NBS / f"{name}.ipynb"
    NBS.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise SystemExit(f"unknown notebook(s) {unknown}; choose from {', '.join(NOTEBOOKS)}")
    for name in names or NOTEBOOKS:
        print(build(name))


if __name__ == "__main__":
    main(sys.argv[1:])
