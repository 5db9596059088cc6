"""Where a run happened and with what: the hardware and library-version strings every record carries.

One home for them: the recipe's console line and metrics.json (`device_text`), the sweep's records
and table header (`hardware`), the model bundle's ``versions`` (`versions`) and the benches'
environment block (bench/_common.py, built from `cpu_model` and `package_version`).
"""

from __future__ import annotations

import platform
from importlib import metadata

import torch

__all__ = ["cpu_model", "device_text", "hardware", "package_version", "versions"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; elsewhere platform's (coarser) answer."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: platform's answer is the best we have
        pass
    return platform.processor() or platform.machine()


def device_text() -> str:
    """Short: what the recipe trains on, e.g. ``GPU NVIDIA H200 (mixed precision)`` or ``CPU (2 threads)``."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)} (mixed precision)"
    return f"CPU ({torch.get_num_threads()} threads)"


def hardware() -> str:
    """Long, for the record: GPU name and CUDA version, or CPU model and thread count; and torch's version."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def package_version(pkg: str) -> str:
    """The installed distribution's version, or ``"not installed"``."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    """Library versions stored next to the weights (for the person who loads them a year later)."""
    import fastai
    import timm
    import torchvision

    from fastlesson import __version__
    return {"fastlesson": __version__, "fastai": fastai.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "python": platform.python_version()}
