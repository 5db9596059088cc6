"""Recipe checkpoints: what a run needs to continue exactly where it stopped, in safe formats.

`RUN/checkpoint/` holds one generation of files, written atomically (fastlesson._io): model weights
(`model-N.safetensors`), the optimizer state (`optimizer-N.pt`, `torch.load(weights_only=True)`),
step 8's best-weights copy (`best-N.safetensors`) and its last cycle ends' weights (`endI-N.safetensors`,
for RecipeConfig.average_cycles), and `state.json` (written last: the run's numbers,
every RNG state, the config and a data fingerprint; it names the files of its generation). A kill at
any moment leaves the previous complete generation in place; older generations are removed after.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fastlesson._io import atomic_write, atomic_write_text
from fastlesson.optim import load_opt_state_dict, opt_state_dict

CHECKPOINT_DIR = "checkpoint"
FORMAT = 1  # state.json layout version


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


# ----------------------------------------------------------------------------- data fingerprint

def _item_lines(ds, split: str) -> list[str]:
    items = getattr(ds, "items", None)
    if items is None:
        return [f"{split}\t{len(ds)} items (no file list)"]
    rows = items.itertuples(index=False) if hasattr(items, "itertuples") else items
    lines = []
    for row in rows:
        path = Path(row[0] if isinstance(row, tuple) else row)
        label = row[1] if isinstance(row, tuple) and len(row) > 1 else ""
        size = path.stat().st_size if path.is_file() else -1
        lines.append(f"{split}\t{path}\t{label}\t{size}")
    return lines


def data_fingerprint(dls) -> dict:
    """What identifies the data a run trains on: counts, classes, and a hash of every file's path,
    label and size (in loader order)."""
    lines = _item_lines(dls.train_ds, "train") + _item_lines(dls.valid_ds, "valid")
    return {"n_train": len(dls.train_ds), "n_valid": len(dls.valid_ds),
            "classes": [str(c) for c in getattr(dls, "vocab", [])],
            "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def fingerprint_difference(saved: dict, now: dict) -> str | None:
    """A sentence naming how the data differ, or None when they do not."""
    for key, what in (("n_train", "training images"), ("n_valid", "validation images"), ("classes", "classes")):
        if saved.get(key) != now.get(key):
            return f"{what}: {saved.get(key)!r} when the run started, {now.get(key)!r} now"
    if saved.get("sha256") != now.get("sha256"):
        return "the same counts, but files were renamed, relabelled or changed in size"
    return None


# ----------------------------------------------------------------------------- RNG states as JSON

def _loaders(dls) -> list:
    return [dl for dl in (getattr(dls, "loaders", None) or []) if isinstance(getattr(dl, "rng", None), random.Random)]


def rng_state(dls_by_name: dict) -> dict:
    """Python, NumPy, torch (and CUDA) RNG states, and each fastai DataLoader's own `rng`, as JSON."""
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
            "loaders": {name: [list(dl.rng.getstate()[1]) for dl in _loaders(dls)]
                        for name, dls in dls_by_name.items() if dls is not None}}


def _py_state(ints: list) -> tuple:
    return (3, tuple(int(i) for i in ints), None)


def restore_rng(state: dict, dls_by_name: dict) -> None:
    """Put every RNG back as `rng_state` saw it."""
    *ints, version, gauss = state["python"]
    random.setstate((version, tuple(ints), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    for name, dls in dls_by_name.items():
        saved = state["loaders"].get(name)
        if dls is None or saved is None:
            continue
        for dl, ints in zip(_loaders(dls), saved):
            dl.rng.setstate(_py_state(ints))


# ----------------------------------------------------------------------------- write and read

def _save_tensors(tensors: dict, path: Path) -> None:
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(plain, str(p)), fsync=True)


def save_checkpoint(run_dir, numbers: dict, model, opt=None, best_state: dict | None = None,
                    extra: dict[str, dict] | None = None) -> Path:
    """Write one checkpoint generation into RUN/checkpoint/ and drop the older ones; returns state.json.
    `extra`: more named sets of tensors (`NAME-N.safetensors`, read back with load_tensors(..., NAME))."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    prev = read_checkpoint(run_dir)
    gen = (prev["generation"] + 1) if prev else 1
    files = {"model": f"model-{gen}.safetensors"}
    _save_tensors(model.state_dict(), d / files["model"])
    if opt is not None:
        files["optimizer"] = f"optimizer-{gen}.pt"
        state = opt_state_dict(opt)
        atomic_write(d / files["optimizer"], lambda p: torch.save(state, p), fsync=True)
    if best_state is not None:
        files["best"] = f"best-{gen}.safetensors"
        _save_tensors(best_state, d / files["best"])
    for name, tensors in (extra or {}).items():
        if name in ("model", "optimizer", "best"):
            raise ValueError(f"save_checkpoint: extra tensors may not be named {name!r} (a file of its own)")
        files[name] = f"{name}-{gen}.safetensors"
        _save_tensors(tensors, d / files[name])
    doc = {"format": FORMAT, "generation": gen, "files": files, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
           **numbers}
    path = atomic_write_text(d / "state.json", json.dumps(doc, indent=1) + "\n")
    keep = set(files.values()) | {"state.json"}
    for f in d.iterdir():
        if f.name not in keep and not f.name.startswith("."):
            f.unlink(missing_ok=True)
    return path


def read_checkpoint(run_dir) -> dict | None:
    """The last complete checkpoint's state.json (None when there is none)."""
    path = checkpoint_dir(run_dir) / "state.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {doc.get('format')!r}, this fastlesson reads {FORMAT}")
    return doc


def load_tensors(run_dir, doc: dict, key: str) -> dict | None:
    name = doc["files"].get(key)
    return None if name is None else load_file(str(checkpoint_dir(run_dir) / name))


def load_optimizer(run_dir, doc: dict, opt) -> bool:
    """Load the saved optimizer state into `opt` (weights_only: no unpickling); False if none saved."""
    name = doc["files"].get("optimizer")
    if name is None:
        return False
    load_opt_state_dict(opt, torch.load(checkpoint_dir(run_dir) / name, weights_only=True))
    return True


def remove_checkpoints(run_dir) -> None:
    d = checkpoint_dir(run_dir)
    if d.is_dir():
        shutil.rmtree(d)
