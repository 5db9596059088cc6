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
# # Quickstart: the whole recipe in one call
#
# **What you will learn**
#
# - how to run the eight-step lesson-2 recipe on the flower sample that ships with fastlesson
#   (no download, no GPU needed) with one call, `run_recipe(RecipeConfig(...))`;
# - what the run writes: a report, its key plots, the metrics, and a *safe* model bundle;
# - how to load that bundle and predict the class of an image.
#
# The eight steps themselves are walked through one cell at a time in `05_recipe_flowers.ipynb`.

# %%
import os

# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.
SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"

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

# %% [markdown]
# ## 1. Run the recipe
#
# `RecipeConfig` holds every setting with its default (see `RecipeConfig?`); `data="sample"` is the
# shipped sample of 10 Oxford flower classes (16 training and 6 validation images each). The run
# prints each step with a one-line result. On a laptop CPU the full-size run takes a few minutes.

# %%
cfg = RecipeConfig(data="sample", out=str(OUT), **(TINY if SMALL else {}))
result = run_recipe(cfg)
print(f"validation accuracy {result.accuracy:.1%}, outputs in {result.out}")

# %% [markdown]
# ## 2. The report
#
# Everything the run did is in `report.md` in the output folder, next to `config.json` (the effective
# settings), `metrics.json`, `history.csv` and the plots. Here is its summary and the table of steps:

# %%
print(sorted(p.name for p in result.out.iterdir()))
report = result.files["report"].read_text()
Markdown(report.split("## Plots")[0])

# %% [markdown]
# ### The LR range test (step 2)
#
# Loss against learning rate while the LR grows every batch; the dashed line is the LR the recipe
# picked. **Look for** a flat start, a falling middle, and the blow-up at the end; the pick should be
# on the falling part, well before the minimum (`01_lr_finder.ipynb` explains why).

# %%
Image(filename=str(result.files["lr_find_head"]))

# %% [markdown]
# ### The learning rate of every batch
#
# **Look for** the shape of each step: one-cycle on the cached activations (step 3), SGDR cycles of
# one epoch for the head (step 4), then SGDR with doubling cycles on the unfrozen network (step 8),
# where the early layer groups run at lower LRs (discriminative LRs).

# %%
Image(filename=str(result.files["lr_schedule"]))

# %% [markdown]
# ### Losses per epoch
#
# **Look for** the validation loss falling with the training loss; when it stops falling while the
# training loss keeps going down, the model starts to overfit, and step 8 stops there and keeps the
# best weights.

# %%
Image(filename=str(result.files["losses"]))

# %% [markdown]
# ### Confusion matrix and top losses
#
# **Look for** the diagonal (correct predictions) and for pairs of classes that are confused with each
# other; the top losses are the validation images the model got most confidently wrong, often
# mislabelled or unusual pictures.

# %%
display(Image(filename=str(result.files["confusion"])))
if "top_losses" in result.files:
    display(Image(filename=str(result.files["top_losses"])))

# %% [markdown]
# ## 3. Predict with the safe bundle
#
# The run exported the model twice: fastai's `export.pkl` (a pickle: loading it runs code from the
# file) and a **safe bundle**, `model.safetensors` (weights only) plus `model.json` (architecture,
# classes, preprocessing). `load_model` loads the bundle without unpickling anything, and refuses a
# pickle unless you say you trust it.

# %%
predictor = load_model(result.out)  # the folder holds the bundle
print(predictor)

try:
    load_model(result.out / "export.pkl")
except ValueError as err:
    print("\nload_model refuses the pickle:", err)

# %%
import json

folder = sorted((sample_path() / "valid").iterdir())[0]  # one class folder of the sample
image = sorted(folder.glob("*.jpg"))[0]
names = json.loads((sample_path() / "cat_to_name.json").read_text())  # class folder -> flower name
true_name = names[folder.name]

pred = predictor.predict(image)[0]
print(f"true class: {true_name}\npredicted:  {pred.label} ({pred.prob:.1%})")
print("top 5:", ", ".join(f"{label} {p:.1%}" for label, p in pred.top5))
# the model's classes are the sample's flowers; the prediction is one of them, the most probable of
# the top 5, which are distinct classes in falling order with probabilities that sum to at most 1
assert sorted(predictor.classes) == sorted(names[f.name] for f in (sample_path() / "valid").iterdir())
labels, probs = zip(*pred.top5)
assert pred.label in predictor.classes and (pred.label, pred.prob) == pred.top5[0]
assert len(set(labels)) == 5 and list(probs) == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
Image(filename=str(image))

# %% [markdown]
# ## Recap
#
# - `run_recipe(RecipeConfig(data=...))` runs all eight steps and writes a report, plots, metrics
#   and the model; `data` can also be `"flowers"`, `"cifar10"` or a folder of your own images.
# - The report's plots tell you whether the LR was sensible, what schedule ran, and when the model
#   started to overfit.
# - `load_model(folder).predict(image)` uses the safe bundle (safetensors + JSON): no pickle.
#   The same is available on the command line: `python scripts/recipe.py` and `python scripts/predict.py`.
