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
# # The eight-step recipe on flowers, one cell at a time
#
# **What you will learn**
#
# - the fast.ai lesson-2 recipe for a state-of-the-art image classifier, step by step, with the
#   fastlesson function behind each step, so you can change any one of them;
# - what each step prints and plots, and what to look for;
# - how to go from the shipped flower sample to the full Oxford 102 flowers data set by changing one
#   variable.
#
# `00_quickstart.ipynb` runs the same eight steps in one call (`run_recipe`).

# %%
import os

# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.
SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"

# %matplotlib inline
import pandas as pd
from fastai.callback.training import BnFreeze, bn_types
from fastai.torch_core import set_seed
from IPython.display import display

from fastlesson import (
    create_learner,
    find_lr,
    fit_sgdr,
    freeze_to,
    load_data,
    lr_groups,
    n_groups,
    precompute_head,
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

# %% [markdown]
# ## Step 1. Data with augmentation, and a pretrained backbone
#
# `load_data` builds fastai DataLoaders with random crops, flips, rotations and lighting changes for
# training (none for validation) and reports anything it had to skip. `create_learner` puts a new
# head for our classes on an ImageNet-pretrained body and freezes the body.
#
# **Look for** in the batch below: the same kind of flower photographed differently; augmentation
# makes each epoch show slightly different versions of every image.

# %%
data = load_data("flowers" if FULL_FLOWERS else "sample", size=SIZE, bs=BS)
print(f"{data.source}: {len(data.classes)} classes, {data.n_train} train / {data.n_valid} valid "
      f"images (validation split: {data.split}); {len(data.skipped)} skipped")
learn = create_learner(data.dls, ARCH, pretrained=True)
print(f"{ARCH}: {n_groups(learn)} layer groups, body frozen")
data.dls.show_batch(max_n=8, nrows=2, figsize=(10, 5))

# %% [markdown]
# ## Step 2. LR range test
#
# Train a few dozen batches with the LR growing exponentially, and pick the highest LR at which the
# loss is still clearly falling (`01_lr_finder.ipynb` has the details). The body is frozen, so its
# output for each image is fixed: `precompute_learner` runs the body once over the (un-augmented)
# training and validation images and gives a learner for the head alone on those cached activations.
# The range test on it takes seconds instead of a hundred full forward and backward passes (fastai
# v0.7 ran `lr_find` on precomputed activations the same way).

# %%
head_learn = precompute_learner(learn)
print(f"body run once in {head_learn.precompute.seconds:.1f} s")
res = find_lr(head_learn, num_it=NUM_IT)
lr_head = res.suggestion
print(f"{res.stop_reason} after {len(res.losses)} batches; head LR = {lr_head:.2e}")
res.plot()

# %% [markdown]
# ## Step 3. Train the head on precomputed activations
#
# Train only the head on the cached activations. An epoch here costs a few percent of a real one, so
# the recipe trains more of them than the lesson's 1-2 (8 by default: on flowers102-small, 2 epochs
# reach ~73% and 8 reach ~85%). This is fast, but without augmentation.

# %%
pc = precompute_head(learn, PRECOMPUTE_EPOCHS, lr_max=lr_head, head_learn=head_learn)
print(f"{pc.epochs} head epoch(s) in {pc.seconds_train:.1f} s; "
      f"valid loss {pc.valid_loss:.3f}, accuracy {pc.accuracy:.1%}")

# %% [markdown]
# ## Step 4. Train the head with augmentation: SGDR, `cycle_len=1`
#
# Now a few epochs through the whole (frozen) network, with augmentation, each epoch one cosine cycle
# that restarts at the head LR. Here fastai's frozen training also trains the body's BatchNorm layers
# (`train_bn`), whose statistics then drift towards the augmented batches; `run_recipe` keeps them
# frozen in this step (eval mode, no gradient), so the head trained in step 3 is not undone. Below,
# the body's BatchNorm layers get no gradient, and fastai's `BnFreeze` callback keeps every BatchNorm
# layer without gradient in eval mode.

# %%
bn_params = [p for m in learn.model[0].modules() if isinstance(m, bn_types) for p in m.parameters()]
for p in bn_params:
    p.requires_grad_(False)  # the body's BatchNorm: ImageNet weights and statistics, as precompute saw them
cycle_ends = fit_sgdr(learn, n_cycles=HEAD_CYCLES, cycle_len=1, cycle_mult=1, lr_max=lr_head,
                      cbs=[BnFreeze()])
print("cycles ended after epochs", [e + 1 for e in cycle_ends])

# %% [markdown]
# ## Step 5. Unfreeze
#
# The lesson unfreezes every layer. On a small data set two changes help, and `run_recipe` makes
# both by default: the early body (stem and first stages, layer group 0) stays frozen (its backward
# pass is the costly one on a CPU, and its generic edge and texture detectors need no change), and the
# body's BatchNorm layers keep their ImageNet statistics (fastai v0.7's `bn_freeze(True)`): trained,
# they follow the small augmented batches. Set `FREEZE_TO = 0` to unfreeze everything.

# %%
freeze_to(learn, FREEZE_TO)
for p in bn_params:
    p.requires_grad_(False)  # freeze_to made them trainable again (fastai's train_bn)

# %% [markdown]
# ## Step 6. Discriminative learning rates
#
# The early layers already detect generic edges and textures and should change least: each layer
# group gets `LR_FACTOR` times less than the next. Here we only fix the *ratios*; step 7 finds the
# overall level.

# %%
ratios = lr_groups(learn, 1.0, factor=LR_FACTOR)
print("LR ratios, early body -> head:", " : ".join(f"{r:.3g}" for r in ratios))

# %% [markdown]
# ## Step 7. LR range test again, on the unfrozen model
#
# The sweep moves all groups together and keeps the ratios from step 6. The head is already trained,
# so the loss starts low and the curve looks different from step 2: flat before it rises, so its
# minimum can land on noise. The recipe keeps the LR between a tenth of the head's LR from step 2 and
# that LR (higher would undo the head training). The early group is frozen: its LR is not used.

# %%
res_full = find_lr(learn, num_it=NUM_IT, lr_ratios=ratios.tolist(), cbs=[BnFreeze()])
lr_top = min(max(res_full.suggestion, lr_head / 10), lr_head)
lrs = ratios * lr_top
print(f"suggested {res_full.suggestion:.2e}, using {lr_top:.2e}; group LRs",
      " / ".join(f"{lr:.1e}" for lr in lrs))
res_full.plot()

# %% [markdown]
# ## Step 8. Train the full network: SGDR with `cycle_mult=2` until it overfits
#
# Cycles of 1, 2, 4, ... epochs, as long as the validation loss keeps improving; the first cycle that
# brings no improvement means the model has started to overfit, so training stops and the best
# weights seen are restored.

# %%
stop = fit_until_overfit(learn, lrs, EPOCHS_MAX, cycle_len=1, cycle_mult=2, cbs=[BnFreeze()])
stop

# %% [markdown]
# ## Evaluate
#
# **Look for** the diagonal of the confusion matrix, and which flowers are mistaken for which: the
# pairs are usually flowers that really do look alike. With the full 102 classes the matrix is too
# big to read, so we list the most-confused pairs instead.

# %%
valid_loss, accuracy = learn.validate()
print(f"validation loss {valid_loss:.3f}, accuracy {accuracy:.1%}")
preds, targs = learn.get_preds()
cm = confusion_matrix(targs.numpy(), preds.argmax(1).numpy(), len(data.classes))
display(pd.DataFrame(most_confused(cm, data.classes, k=10), columns=["actual", "predicted", "count"]))
plot_confusion(cm, data.classes) if len(data.classes) <= 20 else None

# %% [markdown]
# ## Recap
#
# 1. `load_data` + `create_learner`: augmented data, pretrained body, frozen.
# 2. `precompute_learner` + `find_lr`: the body runs once; on its cached activations, the highest LR
#    where the head's loss still clearly falls.
# 3. `precompute_head`: the head on the cached activations (epochs there cost seconds).
# 4. `fit_sgdr(cycle_len=1)`: the head with augmentation, 2-3 one-epoch cycles.
# 5. `freeze_to(1)` (or `unfreeze`), the body's BatchNorm kept frozen.
# 6. `lr_groups(factor=3..10)`: discriminative LRs.
# 7. `find_lr(lr_ratios=...)` again on the unfrozen model.
# 8. `fit_until_overfit`: SGDR with `cycle_mult=2` until validation loss stops improving, keeping the
#    best weights.
#
# Set `FULL_FLOWERS = True` at the top and re-run for the full Oxford flowers data set.
