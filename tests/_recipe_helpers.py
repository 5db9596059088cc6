"""Helpers shared by test_recipe, test_export and test_cli: small real image folders on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root, classes=("a", "b", "c"), n_train=8, n_valid=4, size=(80, 64), seed=0) -> Path:
    """root/train|valid/<class>/*.jpg; each class a different dominant colour so a model can learn it.

    80x64 px keeps data.py on its photo path (RandomResizedCrop + aug_transforms, not the CIFAR one).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("valid", n_valid)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 70, (size[1], size[0], 3)).astype(np.uint8)
                arr[..., ci % 3] += 150
                Image.fromarray(arr).save(d / f"img_{i:03d}.jpg", quality=90)
    return root
