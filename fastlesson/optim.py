"""Lookahead for any torch optimizer, driven by fastai schedules through ``OptimWrapper``.

fastai's own ``Lookahead`` only wraps fastai ``Optimizer`` objects; this one wraps any
``torch.optim.Optimizer`` (e.g. ``torch.optim.RAdam``, the flowers seed's RAdam+Lookahead) and
shares the inner optimizer's ``param_groups``, so fastai's ``set_hyper`` (one-cycle LR and
momentum, discriminative LRs) reaches the optimizer that actually steps.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any

import numpy as np
import torch
from fastai.optimizer import SGD, Adam, OptimWrapper, RAdam, ranger
from fastai.optimizer import Lookahead as FastaiLookahead
from fastcore.foundation import L

__all__ = ["Lookahead", "lookahead", "opt_func", "OPTIMIZERS", "opt_state_dict", "load_opt_state_dict"]


def _check_k_alpha(k: int, alpha: float) -> None:
    """Raise ValueError for a Lookahead setting outside the paper's range."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: Lookahead needs an integer k >= 1 (fast steps per sync; the paper uses 5-10).")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha!r}: Lookahead needs 0 < alpha <= 1 (slow-weight step size; the paper uses 0.5).")


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around any torch optimizer.

    Every ``k`` inner steps: ``slow += alpha * (fast - slow)``; ``fast = slow``. Slow weights start
    at the parameters' values before the first step. ``param_groups`` is the inner optimizer's
    own list, so changing a hyper-parameter on either changes it on both. Parameters without a
    gradient at a sync (frozen or unused) are not pulled back: their slow copy is re-anchored.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer={optimizer!r}: Lookahead wraps a built torch.optim.Optimizer, "
                             "e.g. Lookahead(torch.optim.RAdam(model.parameters())).")
        _check_k_alpha(k, alpha)
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.n_steps = 0  # inner steps taken; a sync happens when it reaches a multiple of k
        # torch's __init__ sets up hooks and `state` (ours: slow weights); then share the group list
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        """One inner step; every k-th step, pull fast weights towards the slow ones."""
        for p in self._params():
            if "slow" not in self.state[p]:  # first step, or a group added later
                self.state[p]["slow"] = p.detach().clone()
        with torch.enable_grad():
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.n_steps += 1
        if self.n_steps % self.k == 0:
            for p in self._params():
                slow = self.state[p]["slow"]
                if p.grad is not None:
                    slow.add_(p.detach() - slow, alpha=self.alpha)
                    p.copy_(slow)
                else:
                    slow.copy_(p)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # during torch's __init__ the groups already belong to the inner optimizer
        if getattr(self, "param_groups", None) is not getattr(self.optimizer, "param_groups", ()):
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """Inner state plus slow weights and step counter; plain tensors/ints, so weights_only loads it."""
        slow = {i: self.state[p]["slow"] for i, p in enumerate(self._params()) if "slow" in self.state[p]}
        return {"inner": self.optimizer.state_dict(),
                "lookahead": {"k": self.k, "alpha": self.alpha, "n_steps": self.n_steps, "slow": slow}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"inner", "lookahead"}:
            raise ValueError(f"Not a Lookahead state_dict (keys {sorted(state_dict)}); expected 'inner' and "
                             "'lookahead', as written by Lookahead.state_dict().")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.param_groups = self.optimizer.param_groups  # torch rebuilds the group dicts on load
        la = state_dict["lookahead"]
        _check_k_alpha(la["k"], la["alpha"])
        self.k, self.alpha, self.n_steps = la["k"], la["alpha"], int(la["n_steps"])
        params = self._params()
        self.state = defaultdict(dict)
        for i, s in la["slow"].items():
            p = params[int(i)]
            self.state[p]["slow"] = s.detach().to(device=p.device, dtype=p.dtype).clone()

    def __getstate__(self) -> dict[str, Any]:
        # torch's version keeps only defaults/state/param_groups; deepcopy and pickle need ours too
        return {**super().__getstate__(), "optimizer": self.optimizer, "k": self.k, "alpha": self.alpha,
                "n_steps": self.n_steps}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, {self.optimizer!r})"


def _build_lookahead(params, opt_cls, k: int, alpha: float, **kw) -> Lookahead:
    """Module-level (picklable) factory that OptimWrapper calls with the converted groups."""
    return Lookahead(opt_cls(params, **kw), k=k, alpha=alpha)


def lookahead(opt_cls: type[torch.optim.Optimizer], k: int = 6, alpha: float = 0.5, **kw):
    """An ``opt_func`` for ``Learner(..., opt_func=...)``: Lookahead around ``opt_cls`` via fastai's OptimWrapper."""
    if not (isinstance(opt_cls, type) and issubclass(opt_cls, torch.optim.Optimizer)):
        raise ValueError(f"opt_cls={opt_cls!r}: pass a torch.optim.Optimizer class such as torch.optim.RAdam; "
                         "for fastai optimizers use fastai.optimizer.Lookahead or opt_func('ranger').")
    _check_k_alpha(k, alpha)
    return partial(OptimWrapper, opt=partial(_build_lookahead, opt_cls=opt_cls, k=k, alpha=alpha), **kw)


_OPT_FUNCS = {
    "adam": Adam,
    "sgd": partial(SGD, mom=0.9),
    "radam": RAdam,
    "lookahead-radam": lookahead(torch.optim.RAdam),
    "ranger": ranger,
}
OPTIMIZERS: tuple[str, ...] = tuple(_OPT_FUNCS)


def opt_func(name: str):
    """The fastai ``opt_func`` for one of ``OPTIMIZERS``."""
    key = str(name).strip().lower()
    if key not in _OPT_FUNCS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    return _OPT_FUNCS[key]


# ----------------------------------------------------------------------------- state that loads safely

def _plain(obj):
    """`obj` with fastcore L -> list and numpy scalars/arrays -> Python numbers/tensors, recursively, so
    that ``torch.load(..., weights_only=True)`` accepts it (schedules leave numpy floats in the hypers)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, L)):
        items = [_plain(v) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    return obj


def opt_state_dict(opt) -> dict:
    """``opt.state_dict()`` of any optimizer ``OPTIMIZERS`` offers (fastai ``Optimizer``, fastai
    ``Lookahead``/ranger, ``OptimWrapper`` around torch or our ``Lookahead``), as plain tensors, numbers
    and lists: it round-trips through ``torch.save`` / ``torch.load(weights_only=True)``."""
    return _plain(opt.state_dict())


def load_opt_state_dict(opt, state: dict) -> None:
    """Load a state from ``opt_state_dict`` (after ``torch.load(weights_only=True)``) into ``opt``."""
    state = dict(state)
    if isinstance(opt, FastaiLookahead) and state.get("slow_weights") is not None:
        state["slow_weights"] = L(L(pg) for pg in state["slow_weights"])  # fastai zips these groups
    if "hypers" in state:
        state["hypers"] = L(state["hypers"])
    opt.load_state_dict(state)
