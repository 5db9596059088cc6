"""precompute_head: body run once without augmentation, cache keyed safely, head trained on the cache."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import GrandparentSplitter, get_image_files, parent_label
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import noop
from fastai.vision.augment import RandomResizedCrop, aug_transforms
from fastai.vision.data import ImageBlock
from fastai.vision.learner import create_head
from torch import nn
from torch.utils.data import TensorDataset

from fastlesson.precompute import clear_memory_cache, precompute_head, precompute_learner

from _tiny import TinyCNN, make_tiny_learner


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    clear_memory_cache()
    yield
    clear_memory_cache()


def image_learner(path, size=24, seed=0) -> Learner:
    """A DataBlock learner with random item + batch augmentation and a fastai head (BN + Dropout)."""
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                       splitter=GrandparentSplitter(train_name="train", valid_name="valid"),
                       item_tfms=RandomResizedCrop(size, min_scale=0.5),
                       batch_tfms=aug_transforms(size=size, min_scale=0.75))
    dls = dblock.dataloaders(path, bs=8, num_workers=0, device="cpu")
    torch.manual_seed(seed)
    body = TinyCNN(3)[0]
    return Learner(dls, nn.Sequential(body, create_head(16, dls.c)), metrics=accuracy)


def _head_preds(learn, feats):
    learn.model.eval()
    with torch.no_grad():
        return learn.model[1](feats.valid_x)


def test_full_model_equals_head_on_cached_activations_tensor_data(tiny_learner):
    learn = tiny_learner()
    res = precompute_head(learn, 2, lr_max=1e-2)
    preds, _ = learn.get_preds(ds_idx=1, act=noop)
    assert torch.allclose(preds, _head_preds(learn, res.features), atol=1e-5)
    assert res.feature_shape == (16, 8, 8) and (res.n_train, res.n_valid) == (64, 32)


def test_full_model_equals_head_on_cached_activations_datablock(image_folder):
    learn = image_learner(image_folder(n_per_class=6))
    res = precompute_head(learn, 1, lr_max=1e-2)
    preds, targs = learn.get_preds(ds_idx=1, act=noop)
    assert torch.allclose(preds, _head_preds(learn, res.features), atol=1e-5)
    assert torch.equal(targs, res.features.valid_y)
    assert res.accuracy == pytest.approx(float((preds.argmax(1) == targs).float().mean()))
    # plain tensors, not fastai's TensorImage/TensorCategory of the batches (a disk hit gives plain ones)
    assert {type(t) for t in res.features.tensors().values()} == {torch.Tensor}


def test_works_on_fastlesson_load_data(image_folder):
    """load_data's DataFrame-backed DataBlock (ColReader items) goes through test_dl as well."""
    from fastlesson.data import load_data

    dls = load_data(image_folder(n_per_class=4), size=24, bs=8).dls
    learn = Learner(dls, nn.Sequential(TinyCNN(3)[0], create_head(16, dls.c)))
    res = precompute_head(learn, 1, lr_max=1e-2)
    preds, _ = learn.get_preds(ds_idx=1, act=noop)
    assert torch.allclose(preds, _head_preds(learn, res.features), atol=1e-5)
    clear_memory_cache()
    assert torch.equal(precompute_head(learn, 1).features.train_x, res.features.train_x)  # no augmentation


def test_no_random_augmentation_in_cached_activations(image_folder):
    """RandomResizedCrop + aug_transforms would give different train activations on every pass."""
    learn = image_learner(image_folder(n_per_class=6))
    first = precompute_head(learn, 1).features
    learn.model[1] = create_head(16, learn.dls.c)  # head changes don't touch the body or its key
    clear_memory_cache()
    again = precompute_head(learn, 1)
    assert not again.cache_hit
    assert torch.equal(first.train_x, again.features.train_x)
    # dataset order, labels as fastai gives them
    assert torch.equal(first.train_y, torch.stack([learn.dls.train_ds[i][1] for i in range(len(learn.dls.train_ds))]))


def test_trains_only_head_and_improves_accuracy(tiny_learner):
    learn = tiny_learner()
    body = {k: v.clone() for k, v in learn.model[0].state_dict().items()}
    before = learn.validate()[1]
    res = precompute_head(learn, 4, lr_max=0.3)
    after = learn.validate()
    assert after[1] > before + 0.15 and res.accuracy == pytest.approx(after[1])
    assert res.valid_loss == pytest.approx(after[0], rel=1e-4)
    for k, v in learn.model[0].state_dict().items():  # body (incl. BN running stats) untouched
        assert torch.equal(v, body[k]), k


def test_head_bn_and_dropout_in_training_mode_during_fit(tiny_learner):
    learn = tiny_learner()
    learn.model[1] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16), nn.Dropout(0.5),
                                   nn.Linear(16, 3))
    seen = []
    learn.model[1][3].register_forward_hook(lambda m, i, o: seen.append(m.training))
    bn_mean = learn.model[1][2].running_mean.clone()
    precompute_head(learn, 1, lr_max=1e-2)
    assert True in seen and False in seen  # train mode while fitting, eval while validating
    assert not torch.equal(learn.model[1][2].running_mean, bn_mean)


def test_disk_cache_hit_and_safe_file(tiny_learner, tmp_path):
    learn = tiny_learner()
    first = precompute_head(learn, 1, cache_dir=tmp_path)
    assert not first.cache_hit and first.cache_path.exists() and first.cache_path.suffix == ".safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path.name]  # no temp file left behind
    clear_memory_cache()
    second = precompute_head(learn, 1, cache_dir=tmp_path)
    assert second.cache_hit and second.cache_key == first.cache_key
    assert torch.equal(second.features.valid_x, first.features.valid_x)
    third = precompute_head(learn, 1)  # memory hit, no disk needed
    assert third.cache_hit
    fourth = precompute_head(learn, 1, cache_dir=tmp_path / "new")  # memory hit still lands on disk
    assert fourth.cache_hit and fourth.cache_path.exists()


@pytest.mark.parametrize("field", ["key", "format", "both"])
def test_tampered_cache_file_is_refused(tiny_learner, tmp_path, field):
    """Either recorded field alone is enough to refuse the file: another key, or an older cache format."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    learn = tiny_learner()
    res = precompute_head(learn, 1, cache_dir=tmp_path)
    with safe_open(str(res.cache_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["key"] == res.cache_key
    if field in ("key", "both"):
        meta["key"] = "something else"
    if field in ("format", "both"):
        meta["format"] = "fastlesson-precompute-0"
    save_file(res.features.tensors(), str(res.cache_path), metadata=meta)
    clear_memory_cache()
    with pytest.raises(ValueError, match="delete it"):
        precompute_head(learn, 1, cache_dir=tmp_path)


def _key(learn, tmp_path):
    return precompute_head(learn, 1, cache_dir=tmp_path)


@pytest.mark.parametrize("change", ["arch", "weights", "size", "data"])
def test_cache_not_reused_when_arch_size_or_data_change(tmp_path, change):
    base = _key(make_tiny_learner(), tmp_path)
    if change == "arch":
        other = make_tiny_learner()
        other.model[0][1][0] = nn.Conv2d(8, 16, 1, stride=2)  # same output shape, different body
        other.model[0].to("cpu")
    elif change == "weights":
        other = make_tiny_learner(seed=1)
        other.dls = make_tiny_learner().dls  # same data, different body weights
    elif change == "size":
        other = make_tiny_learner(size=20)
    else:
        other = make_tiny_learner(n_train=64)
        other.dls = make_tiny_learner(seed=3).dls
        other.model = make_tiny_learner().model  # same body, different data
    res = _key(other, tmp_path)
    assert not res.cache_hit and res.cache_key != base.cache_key
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cache_not_reused_for_different_image_size_or_items(image_folder, tmp_path):
    path = image_folder(n_per_class=4)
    base = precompute_head(image_learner(path, size=24), 1, cache_dir=tmp_path)
    bigger = precompute_head(image_learner(path, size=32), 1, cache_dir=tmp_path)
    other_imgs = precompute_head(image_learner(image_folder("other", n_per_class=4, seed=1)), 1, cache_dir=tmp_path)
    assert not bigger.cache_hit and not other_imgs.cache_hit
    assert len({base.cache_key, bigger.cache_key, other_imgs.cache_key}) == 3
    assert precompute_head(image_learner(path, size=24), 1, cache_dir=tmp_path).cache_hit


@pytest.mark.parametrize("kw, match", [(dict(n_epoch=0), "n_epoch"), (dict(n_epoch=1, lr_max=-1.0), "lr_max"),
                                       (dict(n_epoch=1, bs=-2), "bs=-2"), (dict(n_epoch=1, bs=0), "bs=0")])
def test_bad_arguments(tiny_learner, kw, match):
    with pytest.raises(ValueError, match=match):
        precompute_head(tiny_learner(), **kw)


def test_head_learner_trains_with_the_learners_settings(tiny_learner):
    from functools import partial

    from fastai.optimizer import SGD

    learn = tiny_learner()
    learn.opt_func, learn.wd_bn_bias, learn.train_bn = partial(SGD, mom=0.8), True, False
    learn.model_dir = "elsewhere"
    head = precompute_learner(learn)
    assert head.opt_func is learn.opt_func and head.loss_func is learn.loss_func
    assert (head.wd_bn_bias, head.train_bn, head.model_dir, head.wd, head.moms) == (
        True, False, "elsewhere", learn.wd, learn.moms)
    res = precompute_head(learn, 1)
    assert isinstance(res.seconds_train, float) and res.seconds_train > 0


def test_needs_body_head_model(tiny_learner):
    learn = tiny_learner()
    learn.model = nn.Sequential(*learn.model[0], learn.model[1])
    with pytest.raises(ValueError, match="Sequential\\(body, head\\)"):
        precompute_head(learn, 1)


class _MaxLR(Callback):
    def before_fit(self):
        self.max_lr = 0.0

    def after_batch(self):
        self.max_lr = max(self.max_lr, self.opt.hypers[-1]["lr"])


def test_slice_lr_uses_head_value_and_kw_reach_fit_one_cycle(tiny_learner):
    rec = _MaxLR()
    precompute_head(tiny_learner(), 1, lr_max=slice(1e-5, 2e-2), cbs=rec)
    assert rec.max_lr == pytest.approx(2e-2, rel=0.05)


class _Wrapped(torch.utils.data.Dataset):
    """A data set precompute_head cannot fingerprint cheaply (neither fastai Datasets nor TensorDataset)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_unidentifiable_dataset_is_never_reused(tmp_path):
    from fastai.data.core import DataLoaders

    learn = make_tiny_learner()
    learn.dls = DataLoaders.from_dsets(_Wrapped(learn.dls.train_ds), _Wrapped(learn.dls.valid_ds), bs=16,
                                       device="cpu")
    with pytest.raises(ValueError, match="cache_dir"):
        precompute_head(learn, 1, cache_dir=tmp_path)
    first = precompute_head(learn, 1)
    assert not first.cache_hit and not precompute_head(learn, 1).cache_hit


def test_cache_hit_and_miss_train_the_head_identically(image_folder, tmp_path):
    """The body pass leaves every RNG as it found it: same seed -> same head, cached or not."""
    from fastai.torch_core import set_seed

    path = image_folder(n_per_class=6)
    heads = []
    for cached in (False, True):
        learn = image_learner(path, seed=0)
        set_seed(1)
        res = precompute_head(learn, 2, lr_max=1e-2, cache_dir=tmp_path)
        assert res.cache_hit is cached
        heads.append({k: v.clone() for k, v in learn.model[1].state_dict().items()})
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_lr_range_test_on_the_cache_leaves_the_head_as_it_was(tiny_learner):
    """precompute_learner + find_lr (step 2 of the recipe): the sweep runs on cached activations, the
    head comes back bit for bit, and training the head afterwards equals training it without the sweep."""
    from fastai.torch_core import set_seed

    from fastlesson.finder import find_lr

    set_seed(0)  # the head's DataLoader draws its shuffle seed from Python's global RNG
    learn = tiny_learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    hl = precompute_learner(learn)
    assert hl.model is learn.model[1] and not hl.cache.hit
    res = find_lr(hl, num_it=30)
    assert len(res.lrs) >= 16 and res.suggestion > 0
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())
    after_sweep = precompute_head(learn, 2, lr_max=1e-2, head_learn=hl)

    clear_memory_cache()
    set_seed(0)
    fresh = tiny_learner()
    plain = precompute_head(fresh, 2, lr_max=1e-2)
    assert torch.equal(after_sweep.features.train_x, plain.features.train_x)
    for (k, a), b in zip(learn.model[1].state_dict().items(), fresh.model[1].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    with pytest.raises(ValueError, match="precompute_learner"):
        precompute_head(fresh, 1, lr_max=1e-2, head_learn=hl)  # a head learner of another model


def _changed_after(ds: TensorDataset, start: int, tail: str) -> TensorDataset:
    """A copy of `ds` that is the same up to item `start` and differs after it."""
    x, y = (t.clone() for t in ds.tensors)
    if tail == "labels":  # e.g. mislabelled images fixed
        y[start:] = (y[start:] + 1) % 3
    elif tail == "images":
        x[start:] = x[start:].flip(0)
    else:  # more images
        x, y = torch.cat([x, x[start:] * 0.5]), torch.cat([y, y[start:]])
    return TensorDataset(x, y)


@pytest.mark.parametrize("tail", ["labels", "images", "longer"])
def test_cache_not_reused_for_data_that_differs_only_after_the_first_batch(tmp_path, tail):
    """The first clean batch (hashed on its own) is the same here: only the data identity tells them apart."""
    from fastai.data.core import DataLoaders

    base_learn = make_tiny_learner()
    base = precompute_head(base_learn, 1, cache_dir=tmp_path)
    other = make_tiny_learner()  # the same body weights (seed 0)
    bs = other.dls.train.bs
    train = _changed_after(other.dls.train_ds, bs, tail)
    valid = _changed_after(other.dls.valid_ds, bs, tail)
    other.dls = DataLoaders.from_dsets(train, valid, bs=bs, device="cpu", num_workers=0)
    for new, old in ((train, base_learn.dls.train_ds), (valid, base_learn.dls.valid_ds)):
        assert all(torch.equal(a[:bs], b[:bs]) for a, b in zip(new.tensors, old.tensors))
    res = precompute_head(other, 1, cache_dir=tmp_path)  # base's features are in memory and on disk
    assert not res.cache_hit and res.cache_key != base.cache_key
    assert torch.equal(res.features.train_y, train.tensors[1]) and torch.equal(res.features.valid_y, valid.tensors[1])
    clear_memory_cache()
    assert precompute_head(other, 1, cache_dir=tmp_path).cache_hit  # its own entry is found again
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def relabelled_learner(path, moved: dict[str, str]) -> Learner:
    """A DataBlock learner over `path` whose labels are the folder names, except `moved` (file -> class)."""
    files = sorted(get_image_files(path))  # a fixed order: the first batch is the same for every labelling
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: files,
                       get_y=lambda f: moved.get(str(f.relative_to(path)), parent_label(f)),
                       splitter=GrandparentSplitter(train_name="train", valid_name="valid"),
                       item_tfms=RandomResizedCrop(24, min_scale=0.5))
    dls = dblock.dataloaders(path, bs=8, num_workers=0, device="cpu")
    torch.manual_seed(0)
    return Learner(dls, nn.Sequential(TinyCNN(3)[0], create_head(16, dls.c)), metrics=accuracy)


def test_cache_not_reused_when_an_image_late_in_the_set_is_relabelled(image_folder, tmp_path):
    """Moving the last training image to another class changes neither the items' pixels nor the first batch."""
    path = image_folder(n_per_class=6)
    base = precompute_head(relabelled_learner(path, {}), 1, cache_dir=tmp_path)
    last = "train/c/img_005.jpg"
    learn = relabelled_learner(path, {last: "a"})
    assert learn.dls.vocab == ["a", "b", "c"] and str(learn.dls.train_ds.items[-1].relative_to(path)) == last
    res = precompute_head(learn, 1, cache_dir=tmp_path)
    assert not res.cache_hit and res.cache_key != base.cache_key
    assert res.features.train_y[-1] == 0 and base.features.train_y[-1] == 2  # "a", where it was "c"
    assert torch.equal(res.features.train_x, base.features.train_x)  # same pixels, same body outputs


def test_head_learner_loads_in_process(tiny_learner):
    """The cached activations are in memory: no DataLoader worker processes (a fork under torchrun can
    deadlock, and spawning workers per epoch costs more than the head's epoch)."""
    from fastlesson.precompute import precompute_learner

    head = precompute_learner(tiny_learner(), cache_dir=None)
    assert [dl.fake_l.num_workers for dl in head.dls.loaders] == [0, 0]  # fastai: 1 per CPU by default


def _rows(learn) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of a tiny learner's training then validation TensorDataset, as one table."""
    (xt, yt), (xv, yv) = learn.dls.train_ds.tensors, learn.dls.valid_ds.tensors
    return torch.cat([xt, xv]), torch.cat([yt, yv])


def indexed_learner(x, y, train_idx, valid_idx, frame=False, bs=8, **dl_kw) -> Learner:
    """A fastai `Datasets` learner over rows of in-memory tensors: items are row numbers (`frame`: a
    DataFrame of them, as load_data's items are), labels plain ints. No images, so it is fast."""
    import pandas as pd
    from fastai.data.core import Datasets

    idx = [int(i) for i in (*train_idx, *valid_idx)]
    splits = [list(range(len(train_idx))), list(range(len(train_idx), len(idx)))]
    items, row = (pd.DataFrame({"row": idx}), lambda r: int(r["row"])) if frame else (idx, lambda i: int(i))
    dsets = Datasets(items, tfms=[[row, x.__getitem__], [row, lambda i: int(y[i])]], splits=splits)
    dls = dsets.dataloaders(bs=bs, num_workers=0, device="cpu", **dl_kw)
    torch.manual_seed(0)
    return Learner(dls, TinyCNN(3), loss_func=nn.CrossEntropyLoss())


@pytest.mark.parametrize("frame", [False, True], ids=["list-items", "dataframe-items"])
def test_cache_not_reused_when_a_late_item_is_swapped_for_another_of_its_class(tmp_path, frame):
    """Same first batch, same labels, one other item late in the set: only the items' identity tells the
    two data sets apart (the issue's case: a cache built on one data set reused for another)."""
    x, y = _rows(make_tiny_learner(n_train=65))
    other = next(i for i in range(48, 64) if y[i] == y[47] and not torch.equal(x[i], x[47]))
    valid_idx = range(65, 65 + 32)
    base = precompute_learner(indexed_learner(x, y, range(48), valid_idx, frame), cache_dir=tmp_path)
    swapped = indexed_learner(x, y, [*range(47), other], valid_idx, frame)
    res = precompute_learner(swapped, cache_dir=tmp_path)  # base's features are in memory and on disk
    assert not res.cache.hit and res.cache.key != base.cache.key
    assert torch.equal(res.features.train_y, base.features.train_y)  # the labels do not tell them apart
    assert not torch.equal(res.features.train_x[-1], base.features.train_x[-1])
    clear_memory_cache()
    assert precompute_learner(swapped, cache_dir=tmp_path).cache.hit  # its own entry is found again


class _BatchSizes:
    """Forward hook: the batch sizes a module sees."""

    def __init__(self, module):
        self.sizes = []
        module.register_forward_hook(lambda m, i, o: self.sizes.append(len(i[0])))


@pytest.mark.parametrize("kind", ["tensor-dataset", "fastai-datasets"])
def test_body_pass_in_dataset_order_whatever_the_valid_loader_does(kind):
    """A validation loader that shuffles, drops its last partial batch and has another batch size (fastai
    allows all three: from_dsets(shuffle=True, drop_last=True) sets both loaders; Datasets.dataloaders
    has val_shuffle, val_bs, dl_kwargs) changes nothing: every item, in dataset order, `bs` at a time."""
    from fastai.data.core import DataLoaders

    n_train, n_valid, bs = 60, 30, 8  # neither a multiple of the batch size
    tiny = make_tiny_learner(n_train=n_train, n_valid=n_valid)
    train, valid = tiny.dls.train_ds.tensors, tiny.dls.valid_ds.tensors
    if kind == "tensor-dataset":
        learn = make_tiny_learner(n_train=n_train, n_valid=n_valid)
        learn.dls = DataLoaders.from_dsets(TensorDataset(*train), TensorDataset(*valid), bs=16, shuffle=True,
                                           drop_last=True, device="cpu", num_workers=0)
    else:
        learn = indexed_learner(*_rows(tiny), range(n_train), range(n_train, n_train + n_valid), bs=16, val_bs=16,
                                val_shuffle=True, dl_kwargs=[{}, {"drop_last": True}])
    assert learn.dls.valid.shuffle and learn.dls.valid.drop_last and learn.dls.valid.bs == 16
    seen = _BatchSizes(learn.model[0])
    feats = precompute_learner(learn, bs=bs).features
    assert seen.sizes == [8] * 7 + [4] + [8] * 3 + [6]  # train, then valid; the last batches partial
    assert torch.equal(feats.train_y, train[1]) and torch.equal(feats.valid_y, valid[1])
    learn.model[0].eval()
    with torch.no_grad():
        assert torch.allclose(feats.train_x, learn.model[0](train[0]), atol=1e-5)
        assert torch.allclose(feats.valid_x, learn.model[0](valid[0]), atol=1e-5)
