"""Helpers shared by test_recipe, test_export and test_cli: small real image folders on disk.

The images come from fastlesson.synthetic, the one home for synthetic image folders.
"""

from __future__ import annotations

from pathlib import Path

from fastlesson.synthetic import make_image_folder


def write_image_folder(root, classes=("a", "b", "c"), n_train=8, n_valid=4, size=(80, 64), seed=0) -> Path:
    """root/train|valid/<class>/*.jpg; each class a different dominant colour so a model can learn it.

    80x64 px keeps data.py on its photo path (RandomResizedCrop + aug_transforms, not the CIFAR one).
    """
    return make_image_folder(root, classes, n_train, n_valid, size, noise=70, level=150, seed=seed)
