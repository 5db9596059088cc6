"""small_cnn: shapes, layer groups, freezing and that it learns."""

import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from torch import nn

from fastlesson import small_cnn, small_cnn_splitter

from _tiny import synthetic_dsets


@pytest.mark.parametrize("channels,fc,n_groups", [((64, 128), (1024,), 3), ((8,), (), 2), ((8, 16, 32), (32, 16), 4)])
def test_shapes_and_groups(channels, fc, n_groups):
    model = small_cnn(10, channels=channels, fc=fc)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    groups = small_cnn_splitter(model)
    assert len(groups) == n_groups
    # every parameter in exactly one group
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_default_is_vgg_blocks_then_fc():
    model = small_cnn(10)
    body, head = model
    convs = [m for m in body.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128]
    assert sum(isinstance(m, nn.MaxPool2d) for m in body.modules()) == 2
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(128 * 8 * 8, 1024), (1024, 10)]


def test_dropout_after_each_hidden_fc():
    head = small_cnn(5, channels=(8,), fc=(32, 16), dropout=0.5)[1]
    drops = [m for m in head if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    assert not any(isinstance(m, nn.Dropout) for m in small_cnn(5, channels=(8,), fc=(32,))[1])


def test_other_input_sizes_and_channels():
    model = small_cnn(3, channels=(8, 16), fc=(16,), in_ch=1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)  # adaptive pool keeps FC sizes


@pytest.mark.parametrize("kw,word", [(dict(channels=()), "channels"), (dict(dropout=1.0), "dropout"),
                                     (dict(fc=(0,)), "fc"), (dict(size=2), "size")])
def test_bad_arguments(kw, word):
    with pytest.raises(ValueError, match=word):
        small_cnn(10, **kw)


def _learner(**kw):
    torch.manual_seed(0)
    train, valid = synthetic_dsets(n_train=64, n_valid=32, n_classes=3, size=16)
    dls = DataLoaders.from_dsets(train, valid, bs=16, device="cpu")
    model = small_cnn(3, channels=(8, 16), fc=(32,), size=16)
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), splitter=small_cnn_splitter, **kw)


def test_freeze_leaves_only_head_trainable():
    learn = _learner(train_bn=False)
    learn.freeze()
    trainable = {id(p) for p in learn.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in learn.model[1].parameters()}
    # fastai's default train_bn=True keeps BN trainable in frozen groups, but no conv weights
    learn = _learner()
    learn.freeze()
    for m in learn.model[0].modules():
        if isinstance(m, nn.Conv2d):
            assert not m.weight.requires_grad
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())


def test_discriminative_lrs_reach_each_group():
    learn = _learner()
    learn.create_opt()
    learn.opt.set_hyper("lr", slice(1e-4, 1e-2))
    lrs = [h["lr"] for h in learn.opt.hypers]
    assert len(lrs) == 3 and lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-2)


def test_trains_on_tiny_data():
    learn = _learner()
    before = learn.validate()[0]
    learn.fit(4, 3e-3)
    after = learn.validate()[0]
    assert after < before * 0.8
