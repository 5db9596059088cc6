"""Precomputed activations (recipe step 3): run the frozen body once, train only the head on the cache.

fastai v2 dropped v0.7's ``precompute=True``. Here the body (``learn.model[0]``) runs once, in eval
mode and without random augmentation, over the training and validation sets; its outputs are
cached (in memory, and on disk under ``cache_dir``) and a fastai ``Learner`` trains the head
(``learn.model[1]``, the same module object) on them with a one-cycle schedule.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import numpy as np
import torch
from fastai.data.core import DataLoaders, Datasets, TfmdLists
from fastai.learner import Learner
from fastai.torch_core import noop
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from fastlesson._io import atomic_write
from fastlesson._rng import preserved_rng
from fastlesson.distributed import (
    all_gather_object,
    gather_shards,
    in_distrib_ctx,
    is_main_process,
    shard_dl,
    trainer_cbs,
)

__all__ = ["PrecomputeResult", "CachedFeatures", "CacheInfo", "HeadLearner", "precompute_head",
           "precompute_learner", "cache_key", "clear_memory_cache"]

_FORMAT = "fastlesson-precompute-1"  # bump when the cache layout or key recipe changes


@dataclass
class CachedFeatures:
    """Body outputs (CPU tensors) and targets, in dataset order."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"train_x": self.train_x, "train_y": self.train_y, "valid_x": self.valid_x, "valid_y": self.valid_y}


@dataclass
class PrecomputeResult:
    """What ``precompute_head`` did: timings (s), final losses, accuracy (fraction) and the cache used."""
    epochs: int
    seconds_cache: float  # building (or loading) the activations, key included
    seconds_train: float  # head training, all epochs
    train_loss: float
    valid_loss: float
    accuracy: float | None  # None when targets are not class indices
    cache_key: str
    cache_hit: bool  # True when activations came from memory or disk instead of running the body
    cache_path: Path | None = None
    feature_shape: tuple[int, ...] = ()
    n_train: int = 0
    n_valid: int = 0
    features: CachedFeatures | None = field(default=None, repr=False)

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds_train / max(self.epochs, 1)


# One entry only: activations can be hundreds of MB (flowers at 160 px: 1280x5x5 floats per image).
_MEMORY: dict[str, CachedFeatures] = {}


def clear_memory_cache() -> None:
    """Forget the in-memory activations kept from the last ``precompute_head`` call."""
    _MEMORY.clear()


def _split_model(learn: Learner) -> tuple[nn.Module, nn.Module]:
    model = learn.model
    if not isinstance(model, nn.Sequential) or len(model) != 2:
        raise ValueError(f"precompute_head needs learn.model = nn.Sequential(body, head), got {type(model).__name__}"
                         f"{f' with {len(model)} children' if isinstance(model, nn.Sequential) else ''}; build it "
                         "with fastlesson.models.create_learner or fastai's vision_learner.")
    return model[0], model[1]


def _clean_dl(dls: DataLoaders, ds, bs: int):
    """Sequential loader over ``ds`` with validation-time transforms (no random augmentation)."""
    if isinstance(ds, (Datasets, TfmdLists)) and isinstance(dls.valid_ds, (Datasets, TfmdLists)):
        # test_dl rebuilds the pipelines with split_idx=1, so RandTransforms (train-only) are skipped
        return dls.test_dl(ds.items, with_labels=True, bs=bs, shuffle=False, drop_last=False)
    # plain torch datasets carry no split_idx, so train-only batch transforms are skipped as well
    return dls.valid.new(ds, bs=bs, shuffle=False, drop_last=False)


def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _data_identity(ds) -> bytes | None:
    """Digest of a data set's items and labels (or tensors); None when it cannot be identified cheaply."""
    h = hashlib.sha256()
    if isinstance(ds, TensorDataset):
        for t in ds.tensors:
            _update_tensor(h, t)
        return h.digest()
    if isinstance(ds, Datasets):
        items = ds.items
        h.update(repr(items.to_dict("list") if hasattr(items, "to_dict") else list(items)).encode())
        for tl in ds.tls[ds.n_inp:]:  # labels, through the label pipeline (cheap: no image decoding)
            ys = [tl[i] for i in range(len(ds))]
            h.update(repr([y.tolist() if isinstance(y, torch.Tensor) else y for y in ys]).encode())
        return h.digest()
    return None


def cache_key(learn: Learner, train_dl, valid_dl) -> str | None:
    """Hex key over body (names, shapes, weights), input batches (size, normalisation) and data identity."""
    body, _ = _split_model(learn)
    h = hashlib.sha256(_FORMAT.encode())
    for name, t in body.state_dict().items():
        h.update(name.encode())
        _update_tensor(h, t)
    for dl in (train_dl, valid_dl):
        ident = _data_identity(dl.dataset)
        if ident is None:
            return None
        h.update(ident)
        # the first clean batch pins image size, resizing and normalisation
        _update_tensor(h, _as_plain(next(iter(dl))[0]))
    return h.hexdigest()


def _as_plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


@torch.no_grad()
def _run_body(body: nn.Module, dl, device, shard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Body outputs and targets in dataset order; `shard`: each process runs its part, then all gather."""
    n = len(dl.dataset)
    xs, ys = [], []
    for b in shard_dl(dl) if shard else dl:
        if len(b) != 2:
            raise ValueError(f"precompute_head supports one input and one target per batch, got {len(b)} tensors.")
        xs.append(_as_plain(body(b[0].to(device))).cpu())
        ys.append(_as_plain(b[1]).cpu())
    if not xs:
        raise ValueError("precompute_head got an empty data set; check learn.dls.train_ds and learn.dls.valid_ds.")
    x, y = torch.cat(xs), torch.cat(ys)
    return (gather_shards(x, n, dl.bs), gather_shards(y, n, dl.bs)) if shard else (x, y)


def _save(path: Path, feats: CachedFeatures, key: str) -> None:
    """Write to a temporary file, then os.replace: a crash never leaves a half-written cache."""
    tensors = {k: v.contiguous() for k, v in feats.tensors().items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": _FORMAT, "key": key}))


def _load(path: Path, key: str) -> CachedFeatures:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key or meta.get("format") != _FORMAT:
        raise ValueError(f"Cache file {path} does not match key {key[:12]}... (format {meta.get('format')!r}); "
                         "delete it and run again.")
    return CachedFeatures(**load_file(str(path)))


def _head_lr(learn: Learner, lr_max) -> float:
    """The head's LR: the last group's value of a slice or per-group array, as frozen fastai training uses."""
    lr = learn.lr if lr_max is None else lr_max
    if isinstance(lr, slice):
        lr = lr.stop
    lr = float(np.asarray(lr, dtype=float).reshape(-1)[-1])
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr_max={lr_max!r}: the head needs a positive LR; try learn.lr_find() or 1e-3.")
    return lr


def _features(learn, bs, cache_dir, device) -> tuple[CachedFeatures, str, bool, Path | None]:
    body, _ = _split_model(learn)
    train_dl = _clean_dl(learn.dls, learn.dls.train_ds, bs)
    valid_dl = _clean_dl(learn.dls, learn.dls.valid_ds, bs)
    key = cache_key(learn, train_dl, valid_dl)
    if key is None and cache_dir is not None:
        raise ValueError(f"cache_dir={str(cache_dir)!r}: cannot identify a {type(learn.dls.train_ds).__name__} data "
                         "set safely; use fastai Datasets / a TensorDataset, or pass cache_dir=None.")
    path = Path(cache_dir) / f"precompute-{key}.safetensors" if cache_dir is not None else None
    if key is not None and key in _MEMORY:
        if path is not None and not path.exists() and is_main_process():
            _save(path, _MEMORY[key], key)
        return _MEMORY[key], key, True, path
    shard = in_distrib_ctx(learn)  # data-parallel: the body pass is split across the processes
    # data-parallel, every process must take the same branch: load only where all of them see the file
    if path is not None and all(all_gather_object(path.exists()) if shard else [path.exists()]):
        feats, hit = _load(path, key), True
    else:
        was_training = body.training
        body.eval()  # BatchNorm running stats, no dropout: the frozen body as it will predict
        try:
            tx, ty = _run_body(body, train_dl, device, shard)
            vx, vy = _run_body(body, valid_dl, device, shard)
        finally:
            body.train(was_training)
        feats, hit = CachedFeatures(tx, ty, vx, vy), False
        if path is not None and is_main_process():  # one writer; the others hold the same tensors
            _save(path, feats, key)
    _MEMORY.clear()
    if key is not None:
        _MEMORY[key] = feats
    return feats, key or "", hit, path


@dataclass
class CacheInfo:
    """Where a `HeadLearner`'s activations came from."""
    key: str  # see cache_key; "" when the data set cannot be identified (nothing cached across calls)
    hit: bool  # True: from memory or disk, the body did not run
    path: Path | None  # the cache file (None: memory only)
    seconds: float  # building (or loading) the activations, key included


class HeadLearner(Learner):
    """fastai's `Learner` for the head alone, on cached body activations (made by `precompute_learner`)."""

    def __init__(self, dls, model, features: CachedFeatures, cache: CacheInfo, **kw):
        super().__init__(dls, model, **kw)
        self.features, self.cache = features, cache  # the activations it trains on, and their origin


def _check_bs(learn: Learner, bs: int | None) -> int:
    bs = learn.dls.train.bs if bs is None else bs
    if bs < 1:
        raise ValueError(f"bs={bs!r}: the batch size must be >= 1 (or None for the learner's own).")
    return bs


def precompute_learner(learn: Learner, cache_dir=None, bs: int | None = None) -> HeadLearner:
    """A fastai ``Learner`` for ``learn.model[1]`` (the same head module) on cached body activations.

    The body runs once (or the cache is reused, see ``cache_key``); the returned learner trains, finds
    LRs for (``find_lr`` on it is fastai v0.7's ``lr_find`` with ``precompute=True``) and validates
    the head in a fraction of the time of full forward passes. Its ``features`` are the cached
    activations, its ``cache`` (a ``CacheInfo``) the key, whether it was a hit, the file and the seconds.
    """
    _, head = _split_model(learn)
    bs = _check_bs(learn, bs)
    device = learn.dls.device or torch.device("cpu")
    learn.model.to(device)

    t0 = time.perf_counter()
    # the body pass must not shift any RNG: a cache hit and a miss then train the head identically
    with preserved_rng(learn.dls):
        feats, key, hit, path = _features(learn, bs, cache_dir, device)
    info = CacheInfo(key, hit, path, time.perf_counter() - t0)

    train_ds = TensorDataset(feats.train_x, feats.train_y)
    valid_ds = TensorDataset(feats.valid_x, feats.valid_y)
    # drop the last partial batch like fastai's train loader, unless that would leave no batch at all.
    # num_workers=0: the tensors are in memory, and fastai's default (one worker process per CPU) forks
    # this process; under torchrun a forked worker can deadlock on a lock a gloo thread held at the fork
    # (seen: rank 1 waiting forever on its worker in step 2's range test)
    dls = DataLoaders.from_dsets(train_ds, valid_ds, bs=bs, device=device, num_workers=0,
                                 drop_last=(len(train_ds) > bs, False))
    return HeadLearner(dls, head, feats, info, loss_func=learn.loss_func, opt_func=learn.opt_func,
                       metrics=learn.metrics, lr=learn.lr, wd=learn.wd, wd_bn_bias=learn.wd_bn_bias,
                       train_bn=learn.train_bn, moms=learn.moms, path=learn.path, model_dir=learn.model_dir,
                       cbs=trainer_cbs(learn))


def precompute_head(learn: Learner, n_epoch: int, lr_max=None, cache_dir=None, bs: int | None = None,
                    head_learn: HeadLearner | None = None, **kw) -> PrecomputeResult:
    """Train only ``learn.model[1]`` for ``n_epoch`` one-cycle epochs on cached body activations.

    ``head_learn``: a learner from ``precompute_learner(learn, ...)`` to reuse (e.g. after ``find_lr``
    on it); by default one is made here.
    """
    if isinstance(n_epoch, bool) or not isinstance(n_epoch, int) or n_epoch < 1:
        raise ValueError(f"n_epoch={n_epoch!r}: pass a whole number of epochs >= 1 (the recipe uses 1-2).")
    _split_model(learn)
    lr = _head_lr(learn, lr_max)
    if head_learn is None:
        head_learn = precompute_learner(learn, cache_dir=cache_dir, bs=bs)
    elif not isinstance(head_learn, HeadLearner) or head_learn.model is not learn.model[1]:
        raise ValueError("head_learn does not train learn.model[1] on cached activations; make it with "
                         "precompute_learner(learn)")
    info, feats = head_learn.cache, head_learn.features

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are shadowing an attribute")
        head_learn.fit_one_cycle(n_epoch, lr, **kw)  # Learner sets head.train()/eval() per phase
    seconds_train = time.perf_counter() - t0

    # read the losses before get_preds: fastai's Recorder edits its last row during get_preds
    train_loss, valid_loss = (float(v) for v in list(head_learn.recorder.values[-1])[:2])
    preds, targs = head_learn.get_preds(ds_idx=1, act=noop)
    acc = None
    if preds.ndim == 2 and targs.ndim == 1 and not targs.is_floating_point():
        acc = float((preds.argmax(1) == targs).float().mean())
    return PrecomputeResult(
        epochs=n_epoch, seconds_cache=info.seconds, seconds_train=seconds_train, train_loss=train_loss,
        valid_loss=valid_loss, accuracy=acc, cache_key=info.key, cache_hit=info.hit, cache_path=info.path,
        feature_shape=tuple(feats.train_x.shape[1:]), n_train=len(feats.train_y), n_valid=len(feats.valid_y),
        features=feats)
