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


# The seed CIFAR-10 project's four networks (issue 16): one conv per block, no BatchNorm.
# Parameters by hand: conv 3x3 = 9*c_in*c_out + c_out, linear = n_in*n_out + n_out; 8x8 maps after 2 pools.
SEED_NETS = {
    "#1": (dict(channels=(64, 128), fc=(1024,)),
           9 * 3 * 64 + 64 + 9 * 64 * 128 + 128 + 8192 * 1024 + 1024 + 1024 * 10 + 10),  # 8,475,530
    "#2": (dict(channels=(128, 128), fc=(4096,)),
           9 * 3 * 128 + 128 + 9 * 128 * 128 + 128 + 8192 * 4096 + 4096 + 4096 * 10 + 10),  # 33,750,666
    "#3": (dict(channels=(64, 128), fc=(1024, 1024)),
           9 * 3 * 64 + 64 + 9 * 64 * 128 + 128 + 8192 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10),
    "#4": (dict(channels=(64, 128), fc=(1024, 1024), dropout=0.65), None),  # = #3's count
}
SEED_NETS["#4"] = (SEED_NETS["#4"][0], SEED_NETS["#3"][1])


@pytest.mark.parametrize("name", sorted(SEED_NETS))
def test_seed_networks_exact_layers_and_parameter_count(name):
    kw, n_params = SEED_NETS[name]
    model = small_cnn(10, convs_per_block=1, bn=False, **kw)
    body, head = model
    assert sum(p.numel() for p in model.parameters()) == n_params
    c1, c2 = kw["channels"]
    # each block: conv (with bias: no BN to absorb it) -> ReLU -> 2x2 max-pool; two conv layers in all
    assert [[type(m) for m in block] for block in body] == [[nn.Conv2d, nn.ReLU, nn.MaxPool2d]] * 2
    assert [(b[0].in_channels, b[0].out_channels, b[0].kernel_size, b[0].padding, b[0].bias is not None)
            for b in body] == [(3, c1, (3, 3), (1, 1), True), (c1, c2, (3, 3), (1, 1), True)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fc = [m for m in head if isinstance(m, nn.Linear)]
    sizes = [c2 * 8 * 8, *kw["fc"], 10]
    assert [(lin.in_features, lin.out_features) for lin in fc] == list(zip(sizes[:-1], sizes[1:]))
    drops = [m.p for m in head if isinstance(m, nn.Dropout)]
    assert drops == ([0.65, 0.65] if name == "#4" else [])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("convs,bn", [(1, True), (2, False), (3, True)])
def test_convs_per_block_and_bn(convs, bn):
    body = small_cnn(10, channels=(8, 16), fc=(), convs_per_block=convs, bn=bn)[0]
    for block, c in zip(body, (8, 16)):
        convs_here = [m for m in block if isinstance(m, nn.Conv2d)]
        assert [conv.out_channels for conv in convs_here] == [c] * convs
        assert all((conv.bias is None) == bn for conv in convs_here)  # bias is redundant before BN
        assert sum(isinstance(m, nn.BatchNorm2d) for m in block) == (convs if bn else 0)
        assert isinstance(block[-1], nn.MaxPool2d)


@pytest.mark.parametrize("kw,word", [(dict(channels=()), "channels"), (dict(dropout=1.0), "dropout"),
                                     (dict(fc=(0,)), "fc"), (dict(size=2), "size"),
                                     (dict(convs_per_block=0), "convs_per_block"),
                                     (dict(convs_per_block=1.5), "convs_per_block")])
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
