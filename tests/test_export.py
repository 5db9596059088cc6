"""Export / load / predict: safe bundle vs fastai's export.pkl, image modes, unreadable files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from fastai.learner import load_learner
from fastai.vision.all import ImageDataLoaders, PILImage, Resize
from PIL import Image

from fastlesson.export import (
    BUNDLE_META,
    BUNDLE_WEIGHTS,
    export_bundle,
    export_learner,
    image_files,
    load_model,
    load_rgb,
    predict_files,
)
from fastlesson.models import create_learner

from _recipe_helpers import write_image_folder

ARCH = "resnet18"  # torchvision, built without weights: small and fast at 32 px
SIZE = 32  # px


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """32 px images gain nothing from threads, and on a busy CPU two threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A briefly trained learner on a real image folder, exported both ways into one folder."""
    root = write_image_folder(tmp_path_factory.mktemp("imgs"), n_train=6, n_valid=3, size=(48, 36))
    torch.manual_seed(0)
    dls = ImageDataLoaders.from_folder(root, train="train", valid="valid", item_tfms=Resize(SIZE), bs=8,
                                       num_workers=0, device="cpu")
    learn = create_learner(dls, arch=ARCH, pretrained=False)
    learn.fit(1, 1e-3)
    out = tmp_path_factory.mktemp("model")
    export_bundle(learn, out)
    export_learner(learn, out / "export.pkl")
    files = sorted((root / "valid").rglob("*.jpg"))
    return learn, out, files, tmp_path_factory.mktemp("variants")


def _probs(pred):
    return dict(pred.top5)


def test_bundle_files_and_metadata(exported):
    learn, out, _, _ = exported
    meta = json.loads((out / BUNDLE_META).read_text())
    assert (out / BUNDLE_WEIGHTS).is_file() and (out / "export.pkl").is_file()
    assert meta["arch"] == ARCH and meta["classes"] == ["a", "b", "c"] and meta["n_out"] == 3
    assert meta["size"] == [SIZE, SIZE] and meta["resize"]["type"] == "Resize"
    mean, std = learn.model_meta["mean"], learn.model_meta["std"]  # the model's own stats, not guessed
    assert np.allclose(meta["mean"], mean) and np.allclose(meta["std"], std)
    for lib in ("fastlesson", "fastai", "torch", "timm"):
        assert meta["versions"][lib]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_bundle_loads_without_unpickling(exported, monkeypatch):
    _, out, files, _ = exported

    def refuse(*a, **k):
        raise AssertionError("the safe bundle must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for target in (out, out / BUNDLE_META, out / BUNDLE_WEIGHTS):
        pred = load_model(target, device="cpu").predict(files[:2])
        assert len(pred) == 2 and pred[0].label in ("a", "b", "c")


def test_bundle_matches_exported_learner(exported):
    """The safe bundle and fastai's load_learner(export.pkl) predict identically on the same images."""
    _, out, files, _ = exported
    fastai_learn = load_learner(out / "export.pkl")
    ours = load_model(out, device="cpu").predict(files)
    for f, p in zip(files, ours):
        label, _, probs = fastai_learn.predict(f)
        assert p.label == label
        assert np.allclose(p.prob, float(probs.max()), atol=1e-5)
        vocab = list(fastai_learn.dls.vocab)
        for lab, pr in p.top5:
            assert pr == pytest.approx(float(probs[vocab.index(lab)]), abs=1e-5)


def test_pickle_refused_unless_trusted(exported):
    _, out, files, _ = exported
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_model(out / "export.pkl")
    trusted = load_model(out / "export.pkl", trust_pickle=True)
    assert trusted.source == "pickle"
    a = trusted.probs(files, tta=True)
    b = load_model(out, device="cpu").probs(files, tta=True)
    assert torch.allclose(a, b, atol=1e-5)


def test_predict_probabilities_and_top5(exported):
    _, out, files, _ = exported
    m = load_model(out, device="cpu")
    p = m.probs(files)
    assert torch.allclose(p.sum(1), torch.ones(len(files)), atol=1e-5)
    pred = m.predict(files[0])[0]
    assert len(pred.top5) == 3  # top5 capped at the number of classes
    assert [q for _, q in pred.top5] == sorted([q for _, q in pred.top5], reverse=True)
    assert (pred.label, pred.prob) == pred.top5[0]
    tta = m.predict(files[:1], tta=True)[0]
    flipped = m.probs([load_rgb(files[0]).transpose(Image.FLIP_LEFT_RIGHT)])[0]
    assert tta.prob == pytest.approx(float((p[0] + flipped).max() / 2), abs=1e-5)


def _upright(seed=0) -> Image.Image:
    """A non-square, non-symmetric RGB image (orientation matters to the model)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (36, 52, 3), dtype=np.uint8)
    arr[:, :10] = (250, 20, 20)
    return Image.fromarray(arr)


def _variants(d):
    """(file, its RGB equivalent) for CMYK, RGBA, palette, greyscale and EXIF-rotated images."""
    up = _upright()
    out = {}
    up.convert("CMYK").save(d / "cmyk.tiff")
    out["cmyk"] = (d / "cmyk.tiff", up)
    rgba = up.convert("RGBA")
    alpha = np.full(up.size[::-1], 255, np.uint8)
    alpha[:, 20:30] = 0  # a transparent band: it must become white, not the hidden colour
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "rgba.png")
    on_white = np.asarray(up).copy()
    on_white[:, 20:30] = 255
    out["rgba"] = (d / "rgba.png", Image.fromarray(on_white))
    pal = up.quantize(64)
    pal.save(d / "palette.png")
    out["palette"] = (d / "palette.png", pal.convert("RGB"))
    grey = up.convert("L")
    grey.save(d / "grey.png")
    out["grey"] = (d / "grey.png", grey.convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer rotates the stored pixels 90 degrees clockwise
    up.transpose(Image.Transpose.ROTATE_90).save(d / "exif.png", exif=exif)
    out["exif"] = (d / "exif.png", up)
    return out


@pytest.mark.parametrize("kind", ["cmyk", "rgba", "palette", "grey", "exif"])
def test_image_modes_predict_like_rgb(exported, kind):
    _, out, _, d = exported
    path, rgb = _variants(d)[kind]
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(rgb))
    m = load_model(out, device="cpu")
    a, b = m.probs([path]), m.probs([rgb])
    assert torch.allclose(a, b, atol=1e-6)


def test_fastai_alone_gets_exif_and_alpha_wrong(exported):
    """What fastai's PILImage.create does with the same files: ignores EXIF, keeps hidden colours."""
    _, _, _, d = exported
    v = _variants(d)
    assert PILImage.create(v["exif"][0]).size != load_rgb(v["exif"][0]).size
    fa = np.asarray(PILImage.create(v["rgba"][0]).convert("RGB"))
    assert not np.array_equal(fa, np.asarray(load_rgb(v["rgba"][0])))


def test_unreadable_file_reported_rest_predicted(exported, tmp_path):
    _, out, files, _ = exported
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "broken.jpg"
    bad.write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("not an image either, and not an image extension")
    good = tmp_path / "sub" / "deep" / "ok.jpg"
    good.parent.mkdir()
    Image.open(files[0]).save(good)
    rows = list(predict_files(load_model(out, device="cpu"), [tmp_path, tmp_path / "missing.jpg"]))
    by = {r["path"]: r for r in rows}
    assert set(by) == {str(bad), str(good), str(tmp_path / "missing.jpg")}  # .txt skipped, recursion
    assert "not a readable image" in by[str(bad)]["error"]
    assert "does not exist" in by[str(tmp_path / "missing.jpg")]["error"]
    assert by[str(good)]["label"] in ("a", "b", "c") and len(by[str(good)]["top5"]) == 3


def test_image_files_recursive_sorted(tmp_path):
    for p in ("b/x.png", "a/y.JPG", "a/z/w.jpeg", "a/readme.md"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"")
    got = [f.relative_to(tmp_path).as_posix() for f in image_files([tmp_path])]
    assert got == ["a/y.JPG", "a/z/w.jpeg", "b/x.png"]


def test_load_model_bad_inputs(tmp_path, exported):
    _, out, _, _ = exported
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model(tmp_path)  # an empty folder: no bundle, no export.pkl
    (tmp_path / BUNDLE_META).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a fastlesson bundle"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rgb(tmp_path / "missing.png")
