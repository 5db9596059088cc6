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
# - the fast.ai lesson-2 recipe for a state-of-the-art image classifier, step by step: each cell below
#   calls one step function of `fastlesson.recipe`, the very functions `run_recipe` (and
#   `python scripts/recipe.py`) runs, so what you read here is what the command does;
# - what each step prints, returns and plots, and what to look for;
# - how to go from the shipped flower sample to the full Oxford 102 flowers data set by changing one
#   variable.
#
# Each step reads and extends one `RecipeState`: the learner, the config, and what earlier steps chose
# (LRs, epochs, timings, the cached activations). To change a step, change its config field, or read
# its function (`fastlesson/recipe.py`, `step_*`). `00_quickstart.ipynb` runs the same steps in one
# call (`run_recipe`).

# %%
import os

# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.
SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"

# %matplotlib inline
import tempfile

import pandas as pd
from IPython.display import Image, display

from fastlesson.recipe import (
    RecipeConfig,
    start_recipe,
    step_data,
    step_discriminative,
    step_evaluate,
    step_full_sgdr,
    step_head_sgdr,
    step_lr_find_full,
    step_lr_find_head,
    step_precompute,
    step_report,
    step_unfreeze,
)

# False: the flower sample shipped with fastlesson (10 classes, offline).
# True: the full Oxford 102 flowers (102 classes, ~8k images, a ~330 MB download on first use).
FULL_FLOWERS = False

cfg = RecipeConfig(
    data="flowers" if FULL_FLOWERS else "sample",
    arch="tf_efficientnet_lite0",  # its ImageNet weights ship with a pip package: works offline
    smoke=SMALL,  # tiny images and one epoch per step under the test suite
    out=os.path.join(tempfile.gettempdir(), "fastlesson-05-recipe"),
)
state = start_recipe(cfg)
state.cfg

# %% [markdown]
# ## Step 1. Data with augmentation, and a pretrained backbone
#
# `load_data` builds fastai DataLoaders with random crops, flips, rotations and lighting changes for
# training (none for validation) and reports anything it had to skip; `create_learner` puts a new head
# for our classes on an ImageNet-pretrained body and freezes the body.
#
# **Look for** in the batch below: the same kind of flower photographed differently; augmentation
# makes each epoch show slightly different versions of every image.

# %%
step_data(state)

# %%
state.learn.dls.show_batch(max_n=8, nrows=2, figsize=(10, 5))

# %% [markdown]
# ## Step 2. LR range test
#
# Train a few dozen batches with the LR growing exponentially, and pick the highest LR at which the
# loss is still clearly falling (`01_lr_finder.ipynb` has the details). The body is frozen, so its
# output for each image is fixed: the body runs once over the (un-augmented) images, and the range
# test trains the head alone on those cached activations, in seconds (as fastai v0.7's `lr_find` with
# `precompute=True`).

# %%
step_lr_find_head(state)

# %%
display(Image(filename=str(state.out / "lr_find_head.png")))

# %% [markdown]
# ## Step 3. Train the head on precomputed activations
#
# Only the head, on the cached activations. An epoch here costs a few percent of a real one, so the
# recipe trains more of them than the lesson's 1-2 (8 by default: on flowers102-small, 2 epochs reach
# ~73% and 8 reach ~85%). Fast, but without augmentation.

# %%
step_precompute(state)

# %% [markdown]
# ## Step 4. Train the head with augmentation: SGDR, `cycle_len=1`
#
# A few epochs through the whole (frozen) network, with augmentation, each epoch one cosine cycle
# restarting at the head LR. fastai's frozen training would also train the body's BatchNorm layers
# (`train_bn`), whose statistics then drift towards the augmented batches and undo step 3; the step
# keeps them frozen (eval mode, no gradient), and gives them back afterwards.

# %%
head_only = step_head_sgdr(state)
head_only

# %% [markdown]
# ## Step 5. Unfreeze
#
# The lesson unfreezes every layer. On a small data set two changes help, both defaults: the early body
# (layer group 0) stays frozen (`freeze_to=1`: its backward pass is the costly one on a CPU, and its
# generic edge and texture detectors need no change), and the body's BatchNorm layers keep their
# ImageNet statistics in steps 7-8 (`bn_freeze`, fastai v0.7's `bn_freeze(True)`).

# %%
step_unfreeze(state)

# %% [markdown]
# ## Step 6. Discriminative learning rates
#
# The early layers already detect generic edges and textures and should change least: each layer
# group gets `lr_factor` times less than the next. This step fixes the *ratios*; step 7 finds the level.

# %%
step_discriminative(state)

# %% [markdown]
# ## Step 7. LR range test again, on the unfrozen model
#
# The sweep moves all groups together, keeping step 6's ratios. The head is trained already, so the
# curve is flat until the loss starts to rise; the step takes a tenth of the LR where it rises
# (`rise_lr`), kept between a tenth of the head's LR and that LR (higher would undo the head training).

# %%
step_lr_find_full(state)

# %%
display(Image(filename=str(state.out / "lr_find_full.png")))

# %% [markdown]
# ## Step 8. Train the full network: SGDR with `cycle_mult=2` until it overfits
#
# Cycles of 1, 2, 4, ... epochs, as long as the validation loss keeps improving (checked at the cycle
# ends, the SGDR snapshots); the first cycle that brings no improvement means the model has started to
# overfit, so training stops and the best weights seen are restored. Then the weights averaged over the
# last 2 cycle ends are validated too, and kept when their validation loss is lower (`average_cycles`).

# %%
step_full_sgdr(state)

# %% [markdown]
# ## Evaluate, report, export
#
# **Look for** the diagonal of the confusion matrix, and which flowers are mistaken for which: the
# pairs are usually flowers that really do look alike (with many classes, the most-confused pairs).

# %%
final = step_evaluate(state)
display(pd.DataFrame(final["most_confused"], columns=["actual", "predicted", "count"]))
display(Image(filename=str(state.out / "confusion.png")))

# %%
result = step_report(state)
print(f"validation accuracy {result.accuracy:.1%}; report in {result.out / 'report.md'}")
# the whole recipe must beat the head alone (step 4), or steps 5-8 did harm
assert result.accuracy >= head_only["accuracy"], (result.accuracy, head_only["accuracy"])

# %% [markdown]
# ## Recap
#
# 1. `step_data`: augmented data, pretrained body, frozen.
# 2. `step_lr_find_head`: the body runs once; on its cached activations, the highest LR where the
#    head's loss still clearly falls.
# 3. `step_precompute`: the head on the cached activations (epochs there cost seconds).
# 4. `step_head_sgdr`: the head with augmentation, 2-3 one-epoch SGDR cycles, body BatchNorm frozen.
# 5. `step_unfreeze`: `freeze_to(1)` (or everything), the body's BatchNorm kept frozen.
# 6. `step_discriminative`: discriminative LRs, `lr_factor` per group.
# 7. `step_lr_find_full`: the range test again on the unfrozen model.
# 8. `step_full_sgdr`: SGDR with `cycle_mult=2` until validation loss stops improving, keeping the
#    best weights.
#
# `run_recipe(cfg)` runs exactly these cells (and checkpoints after each, so `resume_recipe(out)` can
# continue an interrupted run). Set `FULL_FLOWERS = True` at the top and re-run for the full Oxford
# flowers data set.
