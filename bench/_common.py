"""Shared bench helpers: one block that records hardware, versions and repeats next to the figures."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: platform's answer is the best we have
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def env_summary(repeats: int | None = None) -> str:
    """Hardware, library versions and (when given) the number of repeats, one 'key: value' per line."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = [
        f"cpu: {_cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
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
