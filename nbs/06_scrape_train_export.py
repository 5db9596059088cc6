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
# # Your own data set: scrape, train, export, predict
#
# **What you will learn**
#
# - how to build a data set of your own classes (here *daisy*, *horse* and *mango*) from an image
#   search, with every download checked, de-duplicated and split into train/valid;
# - how to read the manifest that records what happened to every URL;
# - how to train on the result, export a safe model bundle, load it and predict.
#
# This machine may have no internet. The notebook first tries the real image search with a short
# timeout; if that fails (or in the test suite, which never touches the network) it says so and builds a small local stand-in data set (drawn pictures
# served from this machine over HTTP), so every following step runs the same way.

# %%
import os

# The test suite sets FASTLESSON_SMALL=1: tiny images, few epochs, so the notebook runs in seconds on CPU.
SMALL = os.environ.get("FASTLESSON_SMALL", "0") == "1"

# %matplotlib inline
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from PIL import Image

from fastlesson import ScrapeConfig, create_learner, fit_one_cycle, load_data, scrape_dataset
from fastlesson.export import export_bundle, load_model
from fastlesson.loopback import LoopbackServer
from fastlesson.synthetic import make_image_folder

CLASSES = ["daisy", "horse", "mango"]
N_IMAGES = 12 if SMALL else 100  # search results asked for, per class
SIZE = 32 if SMALL else 128  # px, training image side
BS = 16  # images per batch
EPOCHS = 1 if SMALL else 4
OUT = Path(tempfile.mkdtemp(prefix="fastlesson-nb06-")) if SMALL else Path("../runs/scrape_demo")

# %% [markdown]
# ## 1. Search and download
#
# `scrape_dataset` searches for each class, downloads every hit with timeouts, a size cap and retries,
# checks that the bytes are really an image (and not a decompression bomb, or too small), converts
# it to a normalised JPEG, drops exact and near duplicates (perceptual hash), splits the rest into
# `train/` and `valid/` and writes `manifest.json`. Here the search gets one attempt with a short
# timeout, so an offline machine finds out quickly.

# %%
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


# %% [markdown]
# ### The offline fallback
#
# Without the internet we make the images ourselves: simple drawings of daisies, horses and mangoes
# with random sizes, positions and colours, written to a folder and served over HTTP on the loopback
# interface. We add three bad URLs on purpose, to see how the scraper records them: a missing file
# (HTTP 404), a text file that is not an image, and an exact copy of an image. The URL list goes to
# `scrape_dataset` through `from_urls`, exactly what `scripts/scrape.py --from-urls FILE` does.
# The drawings come from `fastlesson.synthetic.make_image_folder(..., style="drawing")` and the server
# is `fastlesson.loopback.LoopbackServer`, the same helpers the test suite uses.

# %%
if not online:
    per_class = 15 if SMALL else 40
    fixture = make_image_folder(OUT / "fixture", CLASSES, n_train=per_class, size=128, layout="flat",
                                style="drawing", seed=0)
    (fixture / "notes.txt").write_text("not an image")
    with LoopbackServer(folder=fixture) as server:
        urls = {cls: [server.url(f"/{cls}/{p.name}") for p in sorted((fixture / cls).iterdir())]
                for cls in CLASSES}
        # the three planted bad URLs, and the status the scraper should give each
        first_daisy = sorted((fixture / "daisy").iterdir())[0].name
        bad = {server.url(f"/daisy/{first_daisy}?copy"): "duplicate",
               server.url("/daisy/missing.jpg"): "http_error", server.url("/notes.txt"): "not_image"}
        urls["daisy"] += list(bad)
        url_file = OUT / "urls.json"
        url_file.write_text(json.dumps(urls, indent=1))
        cfg = ScrapeConfig(classes=CLASSES, dest=str(OUT / "offline"), from_urls=str(url_file),
                           retries=0, timeout=5.0, min_per_class=5, progress=False)
        result = scrape_dataset(cfg)
dest = result.dest
print("data set in", dest)

# %% [markdown]
# ## 2. The manifest
#
# `result.summary_table()` is what `scripts/scrape.py` prints: per class, how many URLs were found,
# kept (and split into train/valid) and rejected, by reason. `manifest.json` holds one entry per URL:
# its status, the reason for a rejection, the image size, its hashes and where the file went.
#
# **Look for** the rejected ones: nothing is dropped silently.

# %%
Markdown(result.summary_table())

# %%
manifest = json.loads((dest / "manifest.json").read_text())
entries = pd.DataFrame(manifest["entries"])
cols = ["class", "status", "reason", "split", "width", "height", "path"]
display(entries[entries.status != "ok"][cols])
if not online:  # one entry per URL, and each planted bad URL rejected for its own reason
    assert len(entries) == sum(len(u) for u in urls.values())
    status = entries.set_index("url").status
    assert {url: status[url] for url in bad} == bad, status[list(bad)]
entries[entries.status == "ok"][cols].head()

# %% [markdown]
# ## 3. Train
#
# The scraped folder has the usual `train/<class>/` and `valid/<class>/` layout, so `load_data` reads
# it like any other data set. We train the head of a pretrained EfficientNet-Lite0 with one-cycle.

# %%
data = load_data(dest, size=SIZE, bs=BS)
print(f"{data.classes}: {data.n_train} train / {data.n_valid} valid images")
data.dls.show_batch(max_n=8, nrows=2, figsize=(10, 5))

# %%
learn = create_learner(data.dls, "tf_efficientnet_lite0", pretrained=True)
fit_one_cycle(learn, EPOCHS, 1e-2)

# %% [markdown]
# ## 4. Export, load, predict
#
# `export_bundle` writes the safe bundle: `model.safetensors` (tensors only, nothing executable) and
# `model.json` (architecture, classes and the exact preprocessing). `load_model` rebuilds the model
# from these two files without unpickling anything; `predict` takes image paths or PIL images.

# %%
bundle = OUT / "model"
export_bundle(learn, bundle)
print(sorted(p.name for p in bundle.iterdir()))
predictor = load_model(bundle)
print(predictor)

# %%
valid_images = [p for c in data.classes for p in sorted((dest / "valid" / c).glob("*.jpg"))[:2]]
preds = predictor.predict(valid_images)
assert predictor.classes == list(data.classes)  # the bundle carries the training classes, in order
assert all(p.label in data.classes and 0 <= p.prob <= 1 and p.label == p.top5[0][0] for p in preds)
fig, axes = plt.subplots(1, len(valid_images), figsize=(2.2 * len(valid_images), 2.6))
for ax, path, pred in zip(np.atleast_1d(axes), valid_images, preds):
    ax.imshow(Image.open(path))
    ax.set_title(f"{path.parent.name}\n-> {pred.label} {pred.prob:.0%}", fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# **Look for:** the folder name (the true class) above each prediction. In the test suite's tiny run
# the model has seen each image for one epoch at 32 px, so expect mistakes.

# %% [markdown]
# ## Recap
#
# - `scrape_dataset(ScrapeConfig(classes=[...]))` searches, downloads, verifies, de-duplicates and
#   splits; `from_urls` takes your own URL list instead of a search. Every URL ends with a status in
#   `manifest.json`.
# - The result is a normal `train/` + `valid/` folder: `load_data(folder)` and train as usual.
# - `export_bundle` + `load_model(...).predict(...)`: a model you can share and load safely.
#   On the command line: `scripts/scrape.py`, `scripts/recipe.py --data FOLDER`, `scripts/predict.py`.
