"""Shared pytest fixtures; the helpers behind them live in tests/_tiny.py.

Every test starts from the same random state, whatever ran before it: Python's `random` (fastai draws
each DataLoader's shuffle seed from it), NumPy, torch (CPU and CUDA) are seeded with `TEST_SEED` before
the test's fixtures are set up, and again just before its body runs. The suite runs in random order
(pytest-randomly, which prints `Using --randomly-seed=N`; rerun an order with `-p randomly
--randomly-seed=N`, or turn it off with `-p no:randomly`). pytest-randomly also reseeds `random` and
NumPy per test from its own seed; the reseed before the body overrides that, so the seed it prints
decides the order only, never the values a test sees.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from fastai.torch_core import set_seed

from _tiny import make_image_folder, make_tiny_learner

os.environ.setdefault("MPLBACKEND", "Agg")
# reduced copies of big photos (fastlesson.data's image cache) go to a folder of this run, not ~/.cache
os.environ.setdefault("FASTLESSON_CACHE", tempfile.mkdtemp(prefix="fastlesson-test-cache-"))
# 2 threads (the CI machines' cores), or OMP_NUM_THREADS when set (tools/mutation.sh sets 1)
torch.set_num_threads(max(1, min(int(os.environ.get("OMP_NUM_THREADS", 2)), os.cpu_count() or 1)))

TEST_SEED = 0


def seed_everything(seed: int = TEST_SEED) -> None:
    """Seed every RNG a test can draw from: fastai's set_seed seeds Python's `random`, NumPy's global
    RNG and torch (CPU and every CUDA device)."""
    set_seed(seed)


@pytest.fixture(autouse=True)
def _seeded():
    """Seed before the test's other fixtures (autouse fixtures are set up first)."""
    seed_everything()


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """Seed again right before the test body, after pytest-randomly's own per-test reseed."""
    seed_everything()
    return (yield)


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
