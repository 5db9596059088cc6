"""Hyperparameter sweeps of `small_cnn` (the seed's VGG-block study) and optimizer comparisons.

`run_sweep(SweepConfig(...))` trains every combination of the grid and writes, in ``cfg.out``:

- ``sweep.md``: the seed's table, one column per configuration (parameters, test accuracy, time);
- ``sweep.csv``: one row per configuration;
- ``plots/<key>.png``: train vs valid loss per epoch for each configuration (overfitting shows);
- ``results.json``: finished configurations keyed by a stable hash; a re-run skips them (resume);
- ``models/<key>/``: each trained model as a safe bundle (``fastlesson.load_model``, scripts/predict.py);
- ``grid.yaml`` and ``config.json``: the effective grid and run settings.

With ``train_pct`` the training folder is split (per class, seeded) into training and validation
images, as the seed did (80/20); per-epoch valid loss is measured there and the test accuracy on the
untouched test/ (or valid/) folder. Without it the test folder is the validation set, as before.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from fastai.data.transforms import get_image_files
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from matplotlib.figure import Figure

from fastlesson._io import atomic_write_text, save_png, write_json
from fastlesson.data import VALID_DIRS, load_data
from fastlesson.env import hardware  # re-exported: fastlesson.sweep.hardware stays importable
from fastlesson.optim import OPTIMIZERS, opt_func
from fastlesson.schedule import fit_one_cycle
from fastlesson.smallcnn import small_cnn, small_cnn_splitter

__all__ = ["GRID_KEYS", "DEFAULT_GRID", "SMOKE_GRID", "SCHEDULES", "SweepConfig", "SweepResult", "normalize_grid",
           "expand_grid", "config_key", "run_sweep", "sweep_table", "make_smoke_data", "subset_folder",
           "hardware", "arch_kwargs"]

# Defaults for keys a grid leaves out: the seed's baseline (its Keras model, Adam, a few epochs).
DEFAULT_GRID: dict[str, list] = {
    "lr": [3e-3],            # peak LR of the one-cycle schedule
    "bs": [64],              # images per batch
    "epochs": [5],           # passes over the training set
    "channels": [(64, 128)],  # feature maps per VGG block
    "convs": [2],            # conv layers per block (1 = the seed's cropped VGG)
    "bn": [True],            # BatchNorm after each conv (the seed: none)
    "fc": [(1024,)],         # hidden fully connected sizes
    "dropout": [0.0],        # after each hidden FC layer
    "opt": ["adam"],         # fastlesson.optim.opt_func name
    "sched": ["one_cycle"],  # LR schedule: one_cycle, or fixed (a constant LR, as the seed trained)
}
SCHEDULES = ("one_cycle", "fixed")
GRID_KEYS = tuple(DEFAULT_GRID)
# Two configurations that train in seconds on `make_smoke_data` (16 px images).
SMOKE_GRID: dict[str, list] = {"lr": [1e-3, 3e-3], "bs": [8], "epochs": [2], "channels": [(8,)],
                               "fc": [(16,)], "dropout": [0.0], "opt": ["adam"]}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
_LABELS = {"lr": "learning rate", "bs": "batch size", "epochs": "epochs", "channels": "feature maps",
           "convs": "conv layers per block", "bn": "BatchNorm", "fc": "FC sizes", "dropout": "dropout",
           "opt": "optimizer", "sched": "LR schedule"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


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
        if key == "bn":
            text = str(value).strip().lower()
            if text not in _TRUE + _FALSE:
                raise ValueError
            return text in _TRUE
        if key in ("bs", "epochs", "convs"):
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
        need = {"bs": "a positive integer", "epochs": "a positive integer", "convs": "a positive integer",
                "lr": "a positive float", "dropout": "a float in [0, 1)",
                "bn": "true or false (yes/no)"}.get(key, "a valid value")
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
    bad = [o for o in out["sched"] if o not in SCHEDULES]
    if bad:
        raise ValueError(f"grid sched={bad}: unknown LR schedule; valid: {list(SCHEDULES)}")
    return out


def expand_grid(grid: Mapping | None) -> list[dict]:
    """Every combination of the (normalized) grid, in a stable order (last key varies fastest)."""
    grid = normalize_grid(grid)
    return [dict(zip(GRID_KEYS, combo)) for combo in itertools.product(*(grid[k] for k in GRID_KEYS))]


def config_key(cfg: Mapping, **context) -> str:
    """Stable 12-hex hash of a configuration plus what else changes the result (data, seed, size, ...)."""
    payload = {k: list(v) if isinstance(v, tuple) else v for k, v in {**cfg, **context}.items()}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_smoke_data(root: Path | str, n_classes: int = 3, n_train: int = 12, n_test: int = 6,
                    size: int = 16, seed: int = 0) -> Path:
    """Write a tiny learnable image folder (root/train|test/cls/*.png): class = dominant colour."""
    from .synthetic import make_image_folder

    return make_image_folder(root, [f"class{c}" for c in range(n_classes)], n_train, n_test, size,
                             valid_name="test", fmt="png", noise=80, level=150, seed=seed)


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
class SweepConfig:
    """Everything `run_sweep` needs; scripts/sweep.py builds its options from these fields.

    The grid is the YAML file `grid` (if any), under the list fields below: a list field that is not
    None replaces that key of the file. Keys set nowhere take `DEFAULT_GRID` (`SMOKE_GRID` with `smoke`).
    """

    data: str | None = None  # load_data source: cifar10 | cifar100 | an image folder (train/ + test/ or valid/)
    grid: str | None = None  # YAML file mapping grid keys to lists of options, e.g. bench/sweep_grid.yaml
    out: str = "runs/sweep"  # output folder; a re-run with the same settings resumes there
    seed: int = 42  # seeds the train/valid split, the initial weights and the batch order
    size: int = 32  # px, side of the square input (the smoke data is 16 px and sets 16)
    limit: int | None = None  # keep only the first N images (by name) per class and split; None = all
    train_pct: float | None = None  # fraction of the training split used for training; the rest becomes validation (the seed: 0.8)
    aug: bool = True  # pad-crop + flip augmentation of the training images (False overfits sooner)
    save_models: bool = True  # save each trained configuration as a safe bundle in out/models/<key>/
    smoke: bool = False  # 2 tiny configurations on synthetic 16 px images (seconds on CPU) when data is None
    threads: int | None = None  # torch CPU threads; None = torch's default (all cores)
    # grid keys: a list of options each; every combination is trained. None = the grid file's or the default
    lr: list[float] | None = None  # learning rates: the one-cycle peak, or the fixed LR (default 3e-3)
    bs: list[int] | None = None  # images per batch (default 64)
    epochs: list[int] | None = None  # passes over the training images (default 5)
    channels: list[str] | None = None  # feature maps per VGG block, e.g. 32,64 64,128 (default 64,128)
    convs: list[int] | None = None  # conv layers per block: 1 = the seed's cropped VGG, 2 (default) = VGG's
    bn: list[bool] | None = None  # BatchNorm after each conv: true (default) | false (the seed's)
    fc: list[str] | None = None  # hidden FC sizes, e.g. 1024 1024,1024 none (default 1024)
    dropout: list[float] | None = None  # dropout probability after each hidden FC layer (default 0)
    opt: list[str] | None = None  # optimizers: sgd adam radam lookahead-radam ranger (default adam)
    sched: list[str] | None = None  # LR schedules: one_cycle (default) | fixed (a constant LR, as the seed)

    def grid_spec(self) -> dict:
        """The raw grid: the YAML file, then the list fields on top (SMOKE_GRID under both with `smoke`)."""
        grid: dict = {}
        if self.grid is not None:
            path = Path(self.grid)
            if not path.is_file():
                raise FileNotFoundError(f"grid={str(path)!r}: no such file; see bench/sweep_grid.yaml")
            grid = yaml.safe_load(path.read_text()) or {}
            if not isinstance(grid, dict):
                raise ValueError(f"grid={str(path)!r}: expected a mapping of grid keys {list(GRID_KEYS)} "
                                 f"to lists of options")
        if self.smoke:
            grid = {**SMOKE_GRID, **grid}
        return {**grid, **{k: getattr(self, k) for k in GRID_KEYS if getattr(self, k) is not None}}

    def validate(self) -> SweepConfig:
        """ValueError naming the first bad field (or grid option) and what to use instead."""
        checks = [
            ("size", self.size, isinstance(self.size, int) and self.size >= 8, "an integer >= 8 (px)"),
            ("limit", self.limit, self.limit is None or (isinstance(self.limit, int) and self.limit >= 1),
             "an integer >= 1 (images per class), or None for all"),
            ("train_pct", self.train_pct, self.train_pct is None or 0 < self.train_pct < 1,
             "a fraction between 0 and 1 (the seed: 0.8), or None to validate on the test folder"),
            ("threads", self.threads, self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
             "an integer >= 1, or None for torch's default"),
            ("seed", self.seed, isinstance(self.seed, int), "an integer"),
        ]
        for name, value, ok, need in checks:
            if not ok:
                raise ValueError(f"{name}={value!r}: need {need}")
        if self.data is None and not self.smoke:
            raise ValueError("data=None: give a load_data source (cifar10, cifar100 or an image folder), "
                             "or smoke=True for tiny synthetic images")
        normalize_grid(self.grid_spec())
        return self


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
    if key == "bn":
        return "yes" if value else "no"
    return str(value)


def _loss_pair(r: dict) -> str:
    return f"{r['train_loss'][-1]:.3f} / {r['valid_loss'][-1]:.3f}"


def sweep_table(records: list[dict]) -> str:
    """The seed's Markdown table: one column per configuration, one row per parameter and result."""
    cols = [f"#{i + 1}" for i in range(len(records))]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def row(label: str, cells) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for key in GRID_KEYS:
        row(_LABELS[key], (_fmt(key, r.get(key, DEFAULT_GRID[key][0])) for r in records))
    row("test accuracy", (f"{r['accuracy']:.4f}" for r in records))
    if any(r.get("valid_accuracy") is not None for r in records):
        row("valid accuracy", (f"{r['valid_accuracy']:.4f}" if r.get("valid_accuracy") is not None else "-"
                               for r in records))
    row("final train / valid loss", (_loss_pair(r) for r in records))
    row("best valid loss (epoch)", (f"{min(r['valid_loss']):.3f} ({int(np.argmin(r['valid_loss'])) + 1})"
                                    for r in records))
    row("train / valid images", (f"{r.get('n_train', '?')} / {r.get('n_valid', '?')}" for r in records))
    row("training time (s)", (f"{r['seconds']:.1f}" for r in records))
    row("key", (r["key"] for r in records))
    return "\n".join(lines) + "\n"


def _csv_text(records: list[dict]) -> str:
    import io

    cols = ["key", *GRID_KEYS, "accuracy", "valid_accuracy", "seconds", "final_train_loss", "final_valid_loss",
            "best_valid_epoch", "seed", "aug", "train_pct", "eval_split", "n_train", "n_valid", "n_test",
            "model", "hardware", "data"]
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
    epochs = np.arange(1, len(record["train_loss"]) + 1)
    fig = Figure(figsize=(5, 3.5))  # no pyplot: headless, and no global figure left open
    ax = fig.add_subplot()
    ax.plot(epochs, record["train_loss"], "o-", label="train")
    ax.plot(epochs, record["valid_loss"], "s-", label="valid")
    words = [f"{k}={_fmt(k, record[k])}" for k in GRID_KEYS if k in record]
    ax.set(xlabel="epoch", ylabel="loss", title=" ".join(words[:5]) + "\n" + " ".join(words[5:]),
           xticks=epochs)
    ax.title.set_fontsize(7)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def arch_kwargs(cfg: Mapping, size: int = 32) -> dict:
    """`small_cnn` keyword arguments of one configuration (JSON-able, stored in the model bundle)."""
    return {"channels": [int(c) for c in cfg["channels"]], "fc": [int(f) for f in cfg["fc"]],
            "dropout": float(cfg["dropout"]), "convs_per_block": int(cfg.get("convs", 2)),
            "bn": bool(cfg.get("bn", True)), "size": int(size)}


def _fit(learn: Learner, cfg: Mapping) -> None:
    """One configuration's schedule: fastai one-cycle at peak `lr`, or a constant `lr` (the seed's)."""
    if cfg.get("sched", "one_cycle") == "fixed":
        learn.fit(cfg["epochs"], lr=cfg["lr"])
    else:
        fit_one_cycle(learn, cfg["epochs"], lr_max=cfg["lr"])


def train_config(cfg: Mapping, dls, seed: int = 42, test_dl=None, save_dir: Path | None = None) -> dict:
    """Train `small_cnn` with one configuration on `dls`; per-epoch losses, accuracy and seconds.

    `accuracy` is measured on `test_dl` when given (then `valid_accuracy` is the last epoch's on the
    validation set), else on the validation set. With `save_dir` the trained model is written there
    as a safe bundle (arch "small_cnn" with its `arch_kwargs`), readable by `fastlesson.load_model`.
    """
    set_seed(seed, reproducible=True)
    kwargs = arch_kwargs(cfg, cfg.get("size", 32))
    model = small_cnn(len(dls.vocab), **kwargs)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    splitter=small_cnn_splitter, opt_func=opt_func(cfg["opt"]))
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        _fit(learn, cfg)
    seconds = time.perf_counter() - start
    values = np.array(learn.recorder.values, dtype=float)  # per epoch: train_loss, valid_loss, accuracy
    out = {"train_loss": values[:, 0].tolist(), "valid_loss": values[:, 1].tolist(),
           "accuracy": float(values[-1, 2]), "valid_accuracy": None, "seconds": seconds,
           "n_train": len(dls.train_ds), "n_valid": len(dls.valid_ds), "n_test": len(dls.valid_ds)}
    if test_dl is not None:
        with learn.no_bar(), learn.no_logging():
            test_loss, test_acc = learn.validate(dl=test_dl)
        out.update(valid_accuracy=out["accuracy"], accuracy=float(test_acc), test_loss=float(test_loss),
                   n_test=len(test_dl.dataset))
    if save_dir is not None:
        from fastlesson.export import export_bundle

        export_bundle(learn, save_dir, arch="small_cnn",
                      extra={"arch_kwargs": kwargs, "sweep_config": json.loads(json.dumps(dict(cfg)))})
        out["model"] = str(save_dir)
    return out


def _image_folder(source: str, size: int, seed: int) -> Path:
    """The folder behind a load_data source (a path, or where cifar10/cifar100 were unpacked)."""
    return Path(source) if Path(source).is_dir() else load_data(source, size=size, seed=seed).path


def _split_dirs(folder: Path) -> tuple[Path, Path]:
    """(train/, test/ or valid/ or val/) of an image folder; train_pct needs both."""
    test = next((folder / d for d in reversed(VALID_DIRS) if (folder / d).is_dir()), None)
    if not (folder / "train").is_dir() or test is None:
        raise ValueError(f"train_pct needs {folder} to hold train/ and test/ (or valid/) class folders: the "
                         f"validation images come out of train/, the test accuracy from the other folder")
    return folder / "train", test


def _test_dl(dls, test_dir: Path):
    """Labelled DataLoader of `test_dir`'s class folders with the validation transforms of `dls`."""
    import pandas as pd

    files = [f for f in get_image_files(test_dir) if f.parent != test_dir]
    labels = [f.parent.name for f in files]
    unknown = sorted(set(labels) - {str(c) for c in dls.vocab})
    if unknown:
        raise ValueError(f"{test_dir} has classes {unknown} that the training folder lacks: "
                         f"give both the same class folders")
    df = pd.DataFrame({"path": files, "label": labels, "is_valid": True})
    return dls.test_dl(df, with_labels=True)


@dataclass
class _Data:
    """The images a sweep trains on, resolved once: where they are and how they are split."""

    source: str           # cfg.data as given (or the smoke folder)
    folder: Path | str    # what load_data reads (a limited copy with `limit`)
    size: int
    test_dir: Path | None  # with train_pct: the held-out test folder


def _resolve_data(cfg: SweepConfig, out_dir: Path) -> _Data:
    size = cfg.size
    if cfg.data is None:  # smoke (validate() checked)
        source, size = str(make_smoke_data(out_dir / "smoke-data", size=16)), 16
    else:
        source = str(cfg.data)
    folder: Path | str = source
    if cfg.limit is not None:
        folder = subset_folder(_image_folder(source, size, cfg.seed), out_dir / f"data-limit{cfg.limit}", cfg.limit)
    test_dir = None
    if cfg.train_pct is not None:
        folder, test_dir = _split_dirs(_image_folder(str(folder), size, cfg.seed))
    return _Data(source, folder, size, test_dir)


def _legacy_config(grid: Mapping | None, data, out_dir, **kw) -> SweepConfig:
    """SweepConfig from the old call `run_sweep(grid, data, out_dir, seed=, size=, limit=, aug=)`."""
    grid = dict(grid or {})
    normalize_grid(grid)  # unknown keys fail here, named, not as a TypeError below
    unknown = sorted(set(kw) - {"seed", "size", "limit", "aug", "train_pct", "save_models", "threads"})
    if unknown:
        raise ValueError(f"run_sweep: unknown argument(s) {unknown}; pass a SweepConfig")
    return SweepConfig(data=None if data is None else str(data), out=str(out_dir), **kw,
                       **{k: v for k, v in grid.items()})


def _write_effective(cfg: SweepConfig, grid: dict, n_configs: int, d, out_dir: Path) -> None:
    """grid.yaml (the effective grid) and config.json (the config and what it resolved to)."""
    effective = {"grid": {k: [list(v) if isinstance(v, tuple) else v for v in vals] for k, vals in grid.items()},
                 "data": d.source, "seed": cfg.seed, "size": d.size, "limit": cfg.limit, "aug": cfg.aug,
                 "train_pct": cfg.train_pct, "n_configs": n_configs}
    atomic_write_text(out_dir / "grid.yaml", yaml.safe_dump(effective, sort_keys=False))
    write_json(out_dir / "config.json", {**asdict(cfg), "effective": effective}, indent=1)


def _key_context(cfg: SweepConfig, d) -> dict:
    """What, besides the hyperparameters, makes a result reusable (hashed into its key)."""
    context = {"data": d.source, "seed": cfg.seed, "size": d.size, "limit": cfg.limit, "aug": cfg.aug}
    if cfg.train_pct is not None:  # left out when None, so older results.json keys still match
        context["train_pct"] = cfg.train_pct
    return context


def _loaders(loaded: dict, cfg: SweepConfig, d, bs: int) -> tuple:
    """(DataResult, test DataLoader or None) for batch size `bs`, loaded once and kept in `loaded`."""
    if bs not in loaded:  # batches differ per bs; the images and split do not
        res = load_data(d.folder, size=d.size, bs=bs, seed=cfg.seed, aug=cfg.aug,
                        valid_pct=1 - cfg.train_pct if cfg.train_pct else 0.2)
        loaded[bs] = (res, _test_dl(res.dls, d.test_dir) if d.test_dir is not None else None)
    return loaded[bs]


def _train_record(cfg: SweepConfig, d, c: dict, key: str, data: tuple, out_dir: Path) -> dict:
    """Train configuration `c` on `data` = (DataResult, test DataLoader or None); its results.json record."""
    res, test_dl = data
    save_dir = out_dir / "models" / key if cfg.save_models else None
    out = train_config({**c, "size": d.size}, res.dls, seed=cfg.seed, test_dl=test_dl, save_dir=save_dir)
    record = {"key": key, **c, **out, "seed": cfg.seed, "size": d.size, "limit": cfg.limit, "aug": cfg.aug,
              "train_pct": cfg.train_pct, "data": d.source,
              "eval_split": d.test_dir.name if d.test_dir is not None else res.split,
              "valid_split": f"random {1 - cfg.train_pct:.0%} of train" if cfg.train_pct else res.split,
              "hardware": hardware(), "torch": torch.__version__,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return json.loads(json.dumps(record))  # tuples -> lists, as they come back from results.json


def _write_summary(cfg: SweepConfig, d, records: list, out_dir: Path, results_path: Path) -> tuple[str, dict]:
    """Write sweep.md and sweep.csv; (the table, every output file by role)."""
    table = sweep_table(records)
    files = {"table": out_dir / "sweep.md", "csv": out_dir / "sweep.csv", "results": results_path,
             "grid": out_dir / "grid.yaml", "config": out_dir / "config.json"}
    splits = sorted({r.get("eval_split", "?") for r in records})
    train_part = (f", trained on {cfg.train_pct:.0%} of train/ (the rest validates)" if cfg.train_pct else "")
    header = (f"Sweep of small_cnn on {d.source}" + (f" (first {cfg.limit} images per class)" if cfg.limit else "")
              + f", seed {cfg.seed}, {d.size} px, aug {cfg.aug}{train_part}; accuracy on the "
              + f"{'/'.join(splits)} split; {hardware()}.\n\n")
    atomic_write_text(files["table"], header + table)
    atomic_write_text(files["csv"], _csv_text(records))
    files["plots"] = out_dir / "plots"
    if cfg.save_models:
        files["models"] = out_dir / "models"
    return table, files


def run_sweep(cfg: SweepConfig | Mapping | None, data=None, out_dir: Path | str | None = None, *,
              log: Callable[[str], None] | None = print, **legacy) -> SweepResult:
    """Train every configuration of `cfg`'s grid and write table, CSV, plots and model bundles.

    Finished configurations (same hyperparameters, data, seed, size, limit, train_pct and aug) recorded
    in ``out/results.json`` are not trained again. `limit` keeps the first `limit` images per class
    and split (a copy under ``out/data-limit<N>``), for quick runs. `aug` is load_data's augmentation
    (pad-crop + flip for CIFAR-sized images); without it overfitting shows sooner.
    The old call ``run_sweep(grid, data, out_dir, seed=..., size=..., limit=..., aug=...)`` still works.
    """
    if not isinstance(cfg, SweepConfig):
        cfg = _legacy_config(cfg, data, out_dir if out_dir is not None else "runs/sweep", **legacy)
    elif data is not None or out_dir is not None or legacy:
        raise ValueError("run_sweep(SweepConfig): put data, out and the rest in the config, not as arguments")
    log = log or (lambda msg: None)
    cfg.validate()
    grid = normalize_grid(cfg.grid_spec())
    configs = expand_grid(grid)  # validated before anything is written
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    d = _resolve_data(cfg, out_dir)
    _write_effective(cfg, grid, len(configs), d, out_dir)

    results_path = out_dir / "results.json"
    done = json.loads(results_path.read_text()) if results_path.exists() else {}
    loaded: dict[int, tuple] = {}  # bs -> (DataResult, test DataLoader or None)
    records, trained, resumed = [], 0, 0
    context = _key_context(cfg, d)
    for i, c in enumerate(configs, 1):
        key = config_key(c, **context)
        desc = ", ".join(f"{k}={_fmt(k, v)}" for k, v in c.items())
        if key in done:
            log(f"[{i}/{len(configs)}] {key} done before, skipped: {desc}")
            records.append(done[key])
            resumed += 1
            continue
        log(f"[{i}/{len(configs)}] {key} training: {desc}")
        record = _train_record(cfg, d, c, key, _loaders(loaded, cfg, d, c["bs"]), out_dir)
        plot_losses(record, out_dir / "plots" / f"{key}.png")
        done[key] = record
        write_json(results_path, done, indent=1)  # after each one, so a crash loses one
        records.append(record)
        trained += 1
        log(f"    test accuracy {record['accuracy']:.4f}, {record['seconds']:.1f} s"
            + (f", model {record['model']}" if record.get("model") else ""))

    table, files = _write_summary(cfg, d, records, out_dir, results_path)
    return SweepResult(records, out_dir, table, trained, resumed, files)
