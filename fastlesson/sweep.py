"""Hyperparameter sweeps of `small_cnn` (the seed's VGG-block study) and optimizer comparisons.

`run_sweep(grid, data, out_dir)` trains every combination in `grid` and writes, in `out_dir`:

- ``sweep.md``: the seed's table, one column per configuration (parameters, test accuracy, time);
- ``sweep.csv``: one row per configuration;
- ``plots/<key>.png``: train vs valid loss per epoch for each configuration (overfitting shows);
- ``results.json``: finished configurations keyed by a stable hash; a re-run skips them (resume);
- ``grid.yaml``: the effective grid and run settings.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed

from fastlesson._io import atomic_write_text
from fastlesson.data import load_data
from fastlesson.optim import OPTIMIZERS, opt_func
from fastlesson.schedule import fit_one_cycle
from fastlesson.smallcnn import small_cnn, small_cnn_splitter

__all__ = ["GRID_KEYS", "DEFAULT_GRID", "SMOKE_GRID", "SweepResult", "normalize_grid", "expand_grid",
           "config_key", "run_sweep", "sweep_table", "make_smoke_data", "subset_folder", "hardware"]

# Defaults for keys a grid leaves out: the seed's baseline (its Keras model, Adam, a few epochs).
DEFAULT_GRID: dict[str, list] = {
    "lr": [3e-3],            # peak LR of the one-cycle schedule
    "bs": [64],              # images per batch
    "epochs": [5],           # passes over the training set
    "channels": [(64, 128)],  # feature maps per VGG block
    "fc": [(1024,)],         # hidden fully connected sizes
    "dropout": [0.0],        # after each hidden FC layer
    "opt": ["adam"],         # fastlesson.optim.opt_func name
}
GRID_KEYS = tuple(DEFAULT_GRID)
# Two configurations that train in seconds on `make_smoke_data` (16 px images).
SMOKE_GRID: dict[str, list] = {"lr": [1e-3, 3e-3], "bs": [8], "epochs": [2], "channels": [(8,)],
                               "fc": [(16,)], "dropout": [0.0], "opt": ["adam"]}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
_LABELS = {"lr": "learning rate", "bs": "batch size", "epochs": "epochs", "channels": "feature maps",
           "fc": "FC sizes", "dropout": "dropout", "opt": "optimizer"}


def _sizes(value, key: str) -> tuple[int, ...]:
    """One channels/fc option -> tuple of ints: 64, "32,64", [32, 64]; "", "none" or [] mean ()."""
    if isinstance(value, str):
        text = value.strip().lower()
        parts = [] if text in ("", "none", "-") else text.replace("-", ",").split(",")
    elif isinstance(value, (int, np.integer)):
        parts = [value]
    else:
        parts = list(value)
    try:
        sizes = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r}: give sizes like 64, '32,64' or [32, 64]") from None
    if any(s < 1 for s in sizes):
        raise ValueError(f"{key}={value!r}: sizes must be positive")
    return sizes


def _option(key: str, value):
    """Parse one option of grid key `key` (YAML may give '1e-3' as a string)."""
    try:
        if key in ("channels", "fc"):
            return _sizes(value, key)
        if key in ("bs", "epochs"):
            out = int(value)
            if out < 1 or out != float(value):
                raise ValueError
            return out
        if key in ("lr", "dropout"):
            out = float(value)
            if not (out > 0 if key == "lr" else 0 <= out < 1):
                raise ValueError
            return out
        return str(value).lower()
    except (TypeError, ValueError):
        need = {"bs": "a positive integer", "epochs": "a positive integer", "lr": "a positive float",
                "dropout": "a float in [0, 1)"}.get(key, "a valid value")
        raise ValueError(f"grid {key}={value!r}: need {need}") from None


def normalize_grid(grid: Mapping | None) -> dict[str, list]:
    """Validate keys, fill defaults, wrap scalars into lists and parse every option."""
    grid = dict(grid or {})
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"unknown grid key(s) {unknown}; valid keys: {list(GRID_KEYS)}")
    out = {}
    for key in GRID_KEYS:
        values = grid.get(key, DEFAULT_GRID[key])
        # a bare string/number is one option; a list of ints for channels/fc is a list of one-block options
        if isinstance(values, (str, int, float)) or (key in ("channels", "fc") and isinstance(values, tuple)):
            values = [values]
        values = [_option(key, v) for v in values]
        if not values:
            raise ValueError(f"grid {key}=[]: give at least one value or leave the key out")
        out[key] = list(dict.fromkeys(values))  # drop duplicates, keep order
    bad = [o for o in out["opt"] if o not in OPTIMIZERS]
    if bad:
        raise ValueError(f"grid opt={bad}: unknown optimizer; valid: {list(OPTIMIZERS)}")
    return out


def expand_grid(grid: Mapping | None) -> list[dict]:
    """Every combination of the (normalized) grid, in a stable order (last key varies fastest)."""
    grid = normalize_grid(grid)
    return [dict(zip(GRID_KEYS, combo)) for combo in itertools.product(*(grid[k] for k in GRID_KEYS))]


def config_key(cfg: Mapping, **context) -> str:
    """Stable 12-hex hash of a configuration plus what else changes the result (data, seed, size, ...)."""
    payload = {k: list(v) if isinstance(v, tuple) else v for k, v in {**cfg, **context}.items()}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def hardware() -> str:
    """Where the run happened, for the record: GPU name, or CPU model and thread count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform's answer is all we have
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def make_smoke_data(root: Path | str, n_classes: int = 3, n_train: int = 12, n_test: int = 6,
                    size: int = 16, seed: int = 0) -> Path:
    """Write a tiny learnable image folder (root/train|test/cls/*.png): class = dominant colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(n_classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (size, size, 3))
                img[..., c % 3] += 150
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def subset_folder(src: Path | str, dst: Path | str, limit: int) -> Path:
    """Copy the first `limit` images (by name) of every folder under `src` to `dst`, same tree."""
    src, dst = Path(src), Path(dst)
    if limit < 1:
        raise ValueError(f"limit={limit}: need at least 1 image per class")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: --limit needs an image folder (train/ and test/ or valid/ inside)")
    for folder, _, files in os.walk(src):
        images = sorted(f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not images:
            continue
        out = dst / Path(folder).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in images:
            if not (out / name).exists():
                shutil.copy2(Path(folder) / name, out / name)
    return dst


@dataclass
class SweepResult:
    """What a sweep produced: one record per configuration (grid order) and the files written."""

    records: list[dict]
    out_dir: Path
    table: str
    trained: int = 0   # configurations trained in this call
    resumed: int = 0   # configurations taken from results.json
    files: dict[str, Path] = field(default_factory=dict)


def _fmt(key: str, value) -> str:
    if key in ("channels", "fc"):
        return "-".join(str(v) for v in value) or "none"
    if key == "lr":
        return f"{value:g}"
    return str(value)


def sweep_table(records: list[dict]) -> str:
    """The seed's Markdown table: one column per configuration, one row per parameter and result."""
    cols = [f"#{i + 1}" for i in range(len(records))]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key in GRID_KEYS:
        lines.append(f"| {_LABELS[key]} | " + " | ".join(_fmt(key, r[key]) for r in records) + " |")
    lines.append("| test accuracy | " + " | ".join(f"{r['accuracy']:.4f}" for r in records) + " |")
    lines.append("| final train / valid loss | "
                 + " | ".join(f"{r['train_loss'][-1]:.3f} / {r['valid_loss'][-1]:.3f}" for r in records) + " |")
    lines.append("| training time (s) | " + " | ".join(f"{r['seconds']:.1f}" for r in records) + " |")
    lines.append("| key | " + " | ".join(r["key"] for r in records) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(records: list[dict]) -> str:
    import io

    cols = ["key", *GRID_KEYS, "accuracy", "seconds", "final_train_loss", "final_valid_loss",
            "best_valid_epoch", "seed", "aug", "eval_split", "n_train", "n_valid", "hardware", "data"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, cols, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({**r, "channels": _fmt("channels", r["channels"]), "fc": _fmt("fc", r["fc"]),
                         "final_train_loss": r["train_loss"][-1], "final_valid_loss": r["valid_loss"][-1],
                         "best_valid_epoch": int(np.argmin(r["valid_loss"])) + 1})
    return buf.getvalue()


def plot_losses(record: dict, path: Path) -> Path:
    """Train vs valid loss per epoch for one configuration (PNG); a widening gap is overfitting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(record["train_loss"]) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, record["train_loss"], "o-", label="train")
    ax.plot(epochs, record["valid_loss"], "s-", label="valid")
    ax.set(xlabel="epoch", ylabel="loss",
           title=" ".join(f"{k}={_fmt(k, record[k])}" for k in GRID_KEYS), xticks=epochs)
    ax.title.set_fontsize(7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train_config(cfg: Mapping, dls, seed: int = 42) -> dict:
    """Train `small_cnn` with one configuration on `dls`; per-epoch losses, accuracy and seconds."""
    set_seed(seed, reproducible=True)
    model = small_cnn(len(dls.vocab), channels=cfg["channels"], fc=cfg["fc"], dropout=cfg["dropout"],
                      size=cfg.get("size", 32))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    splitter=small_cnn_splitter, opt_func=opt_func(cfg["opt"]))
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        fit_one_cycle(learn, cfg["epochs"], lr_max=cfg["lr"])
    seconds = time.perf_counter() - start
    values = np.array(learn.recorder.values, dtype=float)  # per epoch: train_loss, valid_loss, accuracy
    return {"train_loss": values[:, 0].tolist(), "valid_loss": values[:, 1].tolist(),
            "accuracy": float(values[-1, 2]), "seconds": seconds,
            "n_train": len(dls.train_ds), "n_valid": len(dls.valid_ds)}


def run_sweep(grid: Mapping | None, data, out_dir: Path | str, seed: int = 42, size: int = 32,
              limit: int | None = None, aug: bool = True,
              log: Callable[[str], None] | None = print) -> SweepResult:
    """Train every configuration of `grid` on `data` (a `load_data` source) and write table, CSV, plots.

    Finished configurations (same hyperparameters, data, seed, size, limit and aug) recorded in
    ``out_dir/results.json`` are not trained again. `limit` keeps the first `limit` images per class
    and split (a copy under ``out_dir/data-limit<N>``), for quick runs. `aug` is load_data's
    augmentation (pad-crop + flip for CIFAR-sized images); without it overfitting shows sooner.
    """
    log = log or (lambda msg: None)
    configs = expand_grid(grid)  # validate before writing anything
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    source = str(data)
    if limit is not None:
        folder = Path(source) if Path(source).is_dir() else load_data(source, size=size, seed=seed).path
        data = subset_folder(folder, out_dir / f"data-limit{limit}", limit)
    effective = {"grid": {k: [list(v) if isinstance(v, tuple) else v for v in vals]
                          for k, vals in normalize_grid(grid).items()},
                 "data": source, "seed": seed, "size": size, "limit": limit, "aug": aug, "n_configs": len(configs)}
    atomic_write_text(out_dir / "grid.yaml", yaml.safe_dump(effective, sort_keys=False))

    results_path = out_dir / "results.json"
    done = json.loads(results_path.read_text()) if results_path.exists() else {}
    loaded: dict[int, object] = {}  # bs -> DataResult
    records, trained, resumed = [], 0, 0
    for i, cfg in enumerate(configs, 1):
        key = config_key(cfg, data=source, seed=seed, size=size, limit=limit, aug=aug)
        desc = ", ".join(f"{k}={_fmt(k, v)}" for k, v in cfg.items())
        if key in done:
            log(f"[{i}/{len(configs)}] {key} done before, skipped: {desc}")
            records.append(done[key])
            resumed += 1
            continue
        log(f"[{i}/{len(configs)}] {key} training: {desc}")
        if cfg["bs"] not in loaded:  # batches differ per bs; the images and split do not
            loaded[cfg["bs"]] = load_data(data, size=size, bs=cfg["bs"], seed=seed, aug=aug)
        res = loaded[cfg["bs"]]
        out = train_config({**cfg, "size": size}, res.dls, seed=seed)
        record = {"key": key, **cfg, **out, "seed": seed, "size": size, "limit": limit, "aug": aug,
                  "data": source, "eval_split": res.split,
                  "hardware": hardware(), "torch": torch.__version__,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        record = json.loads(json.dumps(record))  # tuples -> lists, as they come back from results.json
        plot_losses(record, out_dir / "plots" / f"{key}.png")
        done[key] = record
        atomic_write_text(results_path, json.dumps(done, indent=1))  # after each one, so a crash loses one
        records.append(record)
        trained += 1
        log(f"    accuracy {record['accuracy']:.4f}, {record['seconds']:.1f} s")

    table = sweep_table(records)
    files = {"table": out_dir / "sweep.md", "csv": out_dir / "sweep.csv", "results": results_path,
             "grid": out_dir / "grid.yaml"}
    splits = sorted({r.get("eval_split", "?") for r in records})
    header = (f"Sweep of small_cnn on {source}" + (f" (first {limit} images per class)" if limit else "")
              + f", seed {seed}, {size} px, aug {aug}; accuracy on the {'/'.join(splits)} split; "
              + f"{hardware()}.\n\n")
    atomic_write_text(files["table"], header + table)
    atomic_write_text(files["csv"], _csv_text(records))
    files["plots"] = out_dir / "plots"
    return SweepResult(records, out_dir, table, trained, resumed, files)
