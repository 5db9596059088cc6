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
# # Transfer learning: layer groups, freezing, discriminative LRs, precomputed activations
#
# **What you will learn**
#
# - how a pretrained network is split into *layer groups* (early body, late body, head);
# - what `freeze` and `unfreeze` change, and why BatchNorm layers stay trainable;
# - discriminative learning rates: each earlier group trains 3x-10x slower than the next;
# - precomputed activations: run the frozen body once, cache its outputs, and train the head on the
#   cache, with the time per epoch measured with and without the cache side by side.

# %%
import os

# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.
SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"

# %matplotlib inline
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.torch_core import set_seed
from IPython.display import display

from fastlesson import (
    create_learner,
    fit_one_cycle,
    freeze,
    load_data,
    lr_groups,
    n_groups,
    precompute_head,
    unfreeze,
)
from fastlesson.schedule import resolve_lrs

SIZE = 32 if SMALL else 128  # px, side of the training images
BS = 32  # images per batch
LR = 1e-2  # head LR (Adam)
EPOCHS = 1 if SMALL else 3  # epochs per training run below
SCRATCH = Path(tempfile.mkdtemp(prefix="fastlesson-nb03-"))  # the activation cache goes here

# %% [markdown]
# ## 1. Layer groups
#
# `create_learner` builds `nn.Sequential(body, head)`: the ImageNet-pretrained EfficientNet-Lite0 body
# and a new head for our 10 flower classes. Its splitter cuts the model into three *layer groups*,
# which become three parameter groups of the optimizer, each with its own learning rate: the early
# body (generic edges and textures), the late body (more specific shapes) and the head (random at
# first).

# %%
data = load_data("sample", size=SIZE, bs=BS)
set_seed(42)
learn = create_learner(data.dls, "tf_efficientnet_lite0", pretrained=True)
print("layer groups:", n_groups(learn))


def group_table(learn):
    """Parameters per layer group, and how many of them will be trained."""
    rows = []
    for name, ps in zip(["early body", "late body", "head"], learn.opt.param_lists):
        rows.append({"group": name, "parameters": sum(p.numel() for p in ps),
                     "trainable": sum(p.numel() for p in ps if p.requires_grad)})
    return pd.DataFrame(rows).set_index("group")


table = group_table(learn)
# frozen: the head trains whole, the two body groups only their (few) BatchNorm parameters
assert (table.trainable == table.parameters).tolist() == [False, False, True]
assert (table.trainable > 0).all()
table

# %% [markdown]
# A pretrained learner starts **frozen**: only the head is trained, so the random head cannot wreck the
# pretrained features with large gradients. **Look for** the small number of trainable parameters in
# the two body groups: those are the BatchNorm weights, which fastai keeps trainable (`train_bn=True`)
# because the statistics of our images differ from ImageNet's.
#
# ## 2. Freeze and unfreeze
#
# `freeze` and `unfreeze` return the number of trainable groups (and, unlike fastai's, refuse a
# one-group model where they would silently do nothing).

# %%
unfreeze(learn)
unfrozen = group_table(learn)
display(unfrozen)
assert (unfrozen.trainable == unfrozen.parameters).all()  # every parameter trains
freeze(learn)
assert group_table(learn).equals(table)  # and freeze puts it back as it was
group_table(learn)

# %% [markdown]
# ## 3. Discriminative learning rates
#
# After the head is trained we unfreeze and fine-tune everything, but the early layers already hold
# good generic features and should move less. `lr_groups(learn, lr_max, factor)` gives the head
# `lr_max` and every earlier group `factor` times less; the lesson uses factors of 3 to 10. A fastai
# `slice(lo, hi)` spreads the LRs geometrically instead (`resolve_lrs` shows what it means for a
# model).

# %%
choices = {
    "lr_groups(1e-3, factor=3)": lr_groups(learn, 1e-3, factor=3),
    "lr_groups(1e-3, factor=10)": lr_groups(learn, 1e-3, factor=10),
    "slice(1e-5, 1e-3)": resolve_lrs(learn, slice(1e-5, 1e-3)),
}
# the head gets lr_max, each earlier group `factor` times less; a slice spreads geometrically
assert np.allclose(choices["lr_groups(1e-3, factor=3)"], [1e-3 / 9, 1e-3 / 3, 1e-3])
assert np.allclose(choices["lr_groups(1e-3, factor=10)"], [1e-5, 1e-4, 1e-3])
assert np.allclose(choices["slice(1e-5, 1e-3)"], [1e-5, 1e-4, 1e-3])
lr_table = pd.DataFrame(choices, index=["early body", "late body", "head"]).T
display(lr_table.style.format("{:.1e}"))

fig, ax = plt.subplots(figsize=(7, 3))
for i, (name, lrs) in enumerate(choices.items()):
    ax.bar(np.arange(3) + 0.27 * (i - 1), lrs, width=0.27, label=name)
ax.set_xticks(range(3), ["early body", "late body", "head"])
ax.set_yscale("log")
ax.set_ylabel("learning rate")
ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# **Look for:** on the log axis each step between groups is the same factor; the head always gets the
# largest LR.
#
# ## 4. Train the head, then everything
#
# The recipe in two moves: train the frozen model's head, then unfreeze and train all groups with
# discriminative LRs (head at `LR/10`, each earlier group 3x lower).

# %%
results = []
frozen = {n: p.detach().clone() for n, p in learn.model.named_parameters() if not p.requires_grad}
head = [p.detach().clone() for p in learn.opt.param_lists[-1]]
with learn.no_bar(), learn.no_logging():
    fit_one_cycle(learn, EPOCHS, LR)
results.append(("head only (frozen)", *learn.recorder.values[-1]))
# what freezing promises: the frozen parameters did not move at all, while the head did
params = dict(learn.model.named_parameters())
assert frozen and all(torch.equal(params[n], p) for n, p in frozen.items())
assert not all(torch.equal(p, h) for p, h in zip(learn.opt.param_lists[-1], head))

unfreeze(learn)
lrs = lr_groups(learn, LR / 10, factor=3)
with learn.no_bar(), learn.no_logging():
    fit_one_cycle(learn, EPOCHS, lrs)
results.append(("all groups, LRs " + " / ".join(f"{lr:.1e}" for lr in lrs), *learn.recorder.values[-1]))
pd.DataFrame(results, columns=["stage", "train_loss", "valid_loss", "accuracy"]).set_index("stage").round(3)


# %% [markdown]
# ## 5. Precomputed activations
#
# While the body is frozen its output for an image never changes, except through data augmentation.
# So instead of running the whole network every epoch, `precompute_head` runs the body **once** over
# the training and validation images (no augmentation, body in eval mode), caches the activations (in
# memory and, with `cache_dir`, on disk as safetensors) and trains only the head on them. A second
# call with the same model and data finds the cache and skips the body entirely.
#
# We time the same number of head-only epochs three ways, each from the same fresh learner:
# the normal way (body forward pass every batch, with augmentation), with the cache being built, and
# with the cache already there.

# %%
rows, hits = [], []
for label in ("full forward pass every epoch", "precomputed: building the cache",
              "precomputed: cache already there"):
    dls = load_data("sample", size=SIZE, bs=BS).dls  # fresh loaders: the same batch order every run
    set_seed(42)  # the same head initialisation
    learn = create_learner(dls, "tf_efficientnet_lite0", pretrained=True)
    with learn.no_bar(), learn.no_logging():
        if label.startswith("full"):
            t0 = time.perf_counter()
            fit_one_cycle(learn, EPOCHS, LR)
            rows.append({"method": label, "one-off cache (s)": 0.0,
                         "s per epoch": (time.perf_counter() - t0) / EPOCHS,
                         "accuracy": float(learn.recorder.values[-1][2])})
            continue
        r = precompute_head(learn, EPOCHS, LR, cache_dir=SCRATCH)
    hits.append(r.cache_hit)
    rows.append({"method": f"{label} (hit={r.cache_hit})", "one-off cache (s)": r.seconds_cache,
                 "s per epoch": r.seconds_per_epoch, "accuracy": r.accuracy})
assert hits == [False, True]  # the first run builds the cache, the second finds it
assert rows[1]["accuracy"] == rows[2]["accuracy"]  # and trains on the very same activations

timing = pd.DataFrame(rows).set_index("method")
timing["speed-up per epoch"] = timing["s per epoch"].iloc[0] / timing["s per epoch"]
print(f"cached activations: {r.feature_shape} per image, {r.n_train} train + {r.n_valid} valid images")
timing.round(3)

# %% [markdown]
# **Look for:** the *s per epoch* column. With the cache an epoch only runs the small head, so it is
# many times faster; the body's one pass is paid once (*one-off cache*), and not at all when the cache
# is already there. The price: no data augmentation while training on the cache, which is why the
# recipe follows this step with a few epochs of normal, augmented head training.

# %% [markdown]
# ## Recap
#
# - A pretrained learner has layer groups (early body, late body, head) and starts frozen: only the
#   head (plus BatchNorm) trains.
# - `unfreeze` then lets every group train; give earlier groups 3x-10x lower LRs with `lr_groups` (or
#   a `slice`).
# - `precompute_head` runs the frozen body once and trains the head on cached activations: the same
#   head training at a fraction of the time per epoch, without augmentation.
