"""Shared pytest fixtures; the helpers behind them live in tests/_tiny.py."""

from __future__ import annotations

import os

import pytest
import torch

from _tiny import make_image_folder, make_tiny_learner

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_learner():
    """Factory fixture: `learn = tiny_learner(**kw)`."""
    return make_tiny_learner


@pytest.fixture
def image_folder(tmp_path):
    """Factory fixture: `path = image_folder(layout='flat', classes=...)` under tmp_path."""
    def _make(name="imgs", **kw):
        return make_image_folder(tmp_path / name, **kw)
    return _make
