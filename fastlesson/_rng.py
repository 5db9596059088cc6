"""Save and restore every random-number state a fastai run draws from."""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


class RNGState:
    """The global Python/NumPy/torch (and CUDA) RNGs, plus the shuffle RNGs of `dls`' loaders."""

    def __init__(self, dls=None):
        self.dl_rngs = [(dl, dl.rng.getstate()) for dl in getattr(dls, "loaders", []) or []
                        if isinstance(getattr(dl, "rng", None), random.Random)]
        self.globals = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def restore(self) -> None:
        for dl, state in self.dl_rngs:
            dl.rng.setstate(state)
        py, np_state, cpu, cuda = self.globals
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def preserved_rng(dls=None):
    """Run the block, then put every RNG back: work inside it leaves no trace on later randomness."""
    state = RNGState(dls)
    try:
        yield
    finally:
        state.restore()
