"""Export / load / predict: safe bundle vs fastai's export.pkl, image modes, unreadable files."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.data.core import Datasets, TfmdLists
from fastai.data.transforms import Categorize, parent_label
from fastai.learner import Learner, load_learner
from fastai.vision.all import ImageDataLoaders, PILImage, RandomResizedCrop, Resize
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import fastlesson.export as export_mod
from fastlesson.export import (
    BUNDLE_META,
    BUNDLE_WEIGHTS,
    ONNX_FILE,
    BadModelFileError,
    export_bundle,
    export_learner,
    export_onnx,
    image_files,
    learner_tta,
    load_model,
    load_rgb,
    predict_files,
    preprocessing_spec,
    save_examples,
)
from fastlesson.models import create_learner

from _recipe_helpers import write_image_folder
from _tiny import make_tiny_learner

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
    assert meta["weights"] == BUNDLE_WEIGHTS
    mean, std = learn.model_info.mean, learn.model_info.std  # the model's own stats, not guessed
    assert np.allclose(meta["mean"], mean) and np.allclose(meta["std"], std)
    for lib in ("fastlesson", "fastai", "torch", "timm"):
        assert meta["versions"][lib]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    # export.pkl is fastai's own export of this learner (mutmut credits the module fixture's calls to
    # the first test that uses it, so the files it writes are checked here)
    assert list(load_learner(out / "export.pkl").dls.vocab) == ["a", "b", "c"]


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
    assert trusted.source == "pickle" and trusted.classes == ["a", "b", "c"]
    assert [p.label for p in trusted.predict(files)] == [p.label for p in load_model(out, device="cpu").predict(files)]
    for m, source in ((trusted, "pickle"), (load_model(out, device="cpu"), "bundle")):
        shown = repr(m)  # what a notebook shows: class, architecture, classes, backend, origin
        assert all(part in shown for part in ("TorchPredictor", "'resnet18'", "3 classes", "'torch'", source))
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
    # palette and greyscale references built from the pixels, not with the .convert("RGB") under test
    pal = up.quantize(64)
    pal.save(d / "palette.png")
    lut = np.asarray(pal.getpalette(), np.uint8).reshape(-1, 3)
    out["palette"] = (d / "palette.png", Image.fromarray(lut[np.asarray(pal)]))
    grey = up.convert("L")
    grey.save(d / "grey.png")
    out["grey"] = (d / "grey.png", Image.fromarray(np.repeat(np.asarray(grey)[..., None], 3, axis=2)))
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


# ---------------------------------------------------------------- ONNX, two backends, flip TTA

SAMPLE_PHOTOS = sorted((Path(__file__).resolve().parents[1] / "fastlesson/assets/sample/valid").rglob("*.jpg"))


@pytest.fixture(scope="module")
def onnx_run(exported, tmp_path_factory):
    """The exported resnet18 bundle copied to its own folder, plus model.onnx."""
    learn, out, _, _ = exported
    run = tmp_path_factory.mktemp("onnx_run")
    for name in (BUNDLE_META, BUNDLE_WEIGHTS):
        shutil.copy(out / name, run / name)
    info = export_onnx(learn, run)
    assert info["ok"], info
    return run


@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory):
    """tf_efficientnet_lite0 (SAME padding) with its offline ImageNet weights, 48 px, exported to ONNX."""
    random.seed(0)
    torch.manual_seed(0)
    root = write_image_folder(tmp_path_factory.mktemp("lite0_imgs"), n_train=2, n_valid=2, size=(64, 48))
    dls = ImageDataLoaders.from_folder(root, train="train", valid="valid", bs=6, num_workers=0,
                                       item_tfms=RandomResizedCrop(48, min_scale=0.5), device="cpu")
    learn = create_learner(dls, arch="tf_efficientnet_lite0", pretrained=True)
    run = tmp_path_factory.mktemp("lite0_run")
    export_bundle(learn, run)
    info = export_onnx(learn, run)
    assert info["ok"], info
    return run


def test_onnx_export_records_its_check(onnx_run):
    meta = json.loads((onnx_run / BUNDLE_META).read_text())
    info = meta["onnx"]
    assert (onnx_run / ONNX_FILE).is_file() and info["file"] == ONNX_FILE
    assert info["input_shape"] == ["batch", 3, SIZE, SIZE] and info["checked_on"] == "validation"
    assert info["n_checked"] == 9 and info["top1_agreement"] == 1.0  # the 9 validation images
    assert 0 <= info["max_abs_diff"] <= 1e-4
    assert len(info["sha256"]) == 64 and info["onnxruntime"]


@pytest.mark.parametrize("which", ["resnet18", "lite0"])
def test_onnx_and_torch_agree_on_real_photos(which, onnx_run, lite0_run):
    run = {"resnet18": onnx_run, "lite0": lite0_run}[which]
    ort_model, pt_model = load_model(run, backend="onnx"), load_model(run, backend="torch", device="cpu")
    assert (ort_model.backend, pt_model.backend) == ("onnx", "torch")
    for tta in (False, True):
        a, b = ort_model.probs(SAMPLE_PHOTOS, tta=tta), pt_model.probs(SAMPLE_PHOTOS, tta=tta)
        assert a.shape == (len(SAMPLE_PHOTOS), len(ort_model.classes))
        assert float((a - b).abs().max()) < 1e-4
        assert torch.equal(a.argmax(1), b.argmax(1))


def test_lite0_onnx_matches_the_trained_learner(lite0_run):
    info = json.loads((lite0_run / BUNDLE_META).read_text())["onnx"]
    assert info["max_abs_diff"] <= 1e-4 and info["top1_agreement"] == 1.0


def test_backend_choice(onnx_run, exported, monkeypatch):
    _, out, _, _ = exported
    assert load_model(onnx_run).backend == "onnx"  # auto: the run has model.onnx
    assert load_model(out, device="cpu").backend == "torch"  # auto: no model.onnx
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        load_model(out, backend="onnx")
    with pytest.raises(ValueError, match="backend='tflite'"):
        load_model(onnx_run, backend="tflite")
    monkeypatch.setattr(export_mod, "_onnx_available", lambda: False)
    assert load_model(onnx_run, device="cpu").backend == "torch"  # auto without onnxruntime


def test_export_onnx_failure_is_returned_not_raised(exported, tmp_path, monkeypatch):
    learn, out, _, _ = exported
    for name in (BUNDLE_META, BUNDLE_WEIGHTS):
        shutil.copy(out / name, tmp_path / name)

    def unsupported(model, dummy, path):
        path.write_bytes(b"partial")
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX is not supported\nmore detail")

    monkeypatch.setattr(export_mod, "_torch_onnx_export", unsupported)
    info = export_onnx(learn, tmp_path)
    assert info == {"ok": False, "path": None,
                    "error": "RuntimeError: Exporting the operator 'aten::fancy' to ONNX is not supported"}
    assert not (tmp_path / ONNX_FILE).exists() and not list(tmp_path.glob(".*.tmp"))
    assert json.loads((tmp_path / BUNDLE_META).read_text())["onnx"] == {"error": info["error"]}
    assert load_model(tmp_path, device="cpu").backend == "torch"  # the bundle still works


def test_export_onnx_from_the_bundle_alone(exported, tmp_path):
    """export_onnx(None, run): older runs get model.onnx from their safe bundle."""
    _, out, files, _ = exported
    for name in (BUNDLE_META, BUNDLE_WEIGHTS):
        shutil.copy(out / name, tmp_path / name)
    info = export_onnx(None, tmp_path)
    assert info["ok"] and info["max_abs_diff"] <= 1e-4
    a, b = load_model(tmp_path, backend="onnx").probs(files), load_model(out, device="cpu").probs(files)
    assert float((a - b).abs().max()) < 1e-4


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_flip_tta_is_the_mean_of_image_and_mirror(onnx_run, backend):
    m = load_model(onnx_run, backend=backend, device="cpu")
    imgs = [load_rgb(f) for f in SAMPLE_PHOTOS[:4]]
    mirrored = [i.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for i in imgs]
    # mirroring the photo before the (centred, symmetric) resize = mirroring the model input
    want = (m.probs(imgs) + m.probs(mirrored)) / 2
    got = m.probs(imgs, tta=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got, m.probs(imgs, tta=True))  # deterministic
    assert not torch.allclose(got, m.probs(imgs), atol=1e-4)  # and not the plain prediction


def test_learner_tta_matches_predictor_tta(exported):
    """The recipe's 'with TTA' figure (learner_tta) and predict --tta are one definition."""
    learn, out, _, _ = exported
    probs, targs = learner_tta(learn)
    items = learn.dls.valid_ds.items
    assert probs.shape == (len(items), 3) and targs.tolist() == [learn.dls.vocab.o2i[f.parent.name] for f in items]
    ours = load_model(out, device="cpu").probs(items, tta=True)
    assert torch.allclose(probs, ours, atol=1e-5)
    again, _ = learner_tta(learn)
    assert torch.equal(probs, again)


def test_folder_predicted_in_batches(onnx_run, exported, monkeypatch):
    _, _, files, _ = exported
    m = load_model(onnx_run)
    calls = []
    real = m.batch_probs
    monkeypatch.setattr(m, "batch_probs", lambda x: calls.append(len(x)) or real(x))
    rows = list(predict_files(m, [files[0].parents[1]], bs=4))
    assert len(rows) == len(files) == 9 and calls == [4, 4, 1]


def _predict_cli(argv, capsys):
    from fastlesson.predict import predict_main

    code = predict_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_cli_backends_agree(onnx_run, exported, capsys):
    _, _, files, _ = exported
    rows = {}
    for backend in ("onnx", "torch"):
        code, out, _ = _predict_cli([onnx_run, *files[:4], "--json", "--backend", backend, "--tta"], capsys)
        assert code == 0
        rows[backend] = [json.loads(line) for line in out.splitlines()]
    for a, b in zip(rows["onnx"], rows["torch"]):
        assert a["label"] == b["label"] and a["prob"] == pytest.approx(b["prob"], abs=1e-5)


# ---------------------------------------------------------------- bad model files


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_meta(run, **changes):
    meta = json.loads((run / BUNDLE_META).read_text())
    for k, v in changes.items():
        if v is None:
            meta["onnx"].pop(k, None)
        else:
            meta[k] = v
    (run / BUNDLE_META).write_text(json.dumps(meta))


CORRUPTIONS = {
    # name: (backend, break it, file named in the message, what the message says)
    "truncated safetensors": ("torch", lambda r, o: _truncate(r / BUNDLE_WEIGHTS), BUNDLE_WEIGHTS,
                              "damaged or truncated"),
    "broken model.json": ("auto", lambda r, o: (r / BUNDLE_META).write_text('{"format": "x"\n "arch": 1}'),
                          BUNDLE_META, "not valid JSON"),
    "weights of another class count": ("torch", lambda r, o: _edit_meta(r, n_out=4, classes=list("abcd")),
                                       BUNDLE_WEIGHTS, "wrong shape"),
    "weights of another arch": ("torch", lambda r, o: _edit_meta(r, arch="resnet34"), BUNDLE_WEIGHTS,
                                "tensors missing"),
    "onnx of another model": ("onnx", lambda r, o: shutil.copy(o / ONNX_FILE, r / ONNX_FILE), ONNX_FILE,
                              "SHA-256 differs"),
    "onnx of another model, no checksum": ("onnx", lambda r, o: (_edit_meta(r, sha256=None),
                                           shutil.copy(o / ONNX_FILE, r / ONNX_FILE)), ONNX_FILE,
                                           "input is"),
    "truncated onnx, no checksum": ("onnx", lambda r, o: (_edit_meta(r, sha256=None), _truncate(r / ONNX_FILE)),
                                    ONNX_FILE, "not a readable ONNX model"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_model_files_name_the_file(case, onnx_run, lite0_run, tmp_path, capsys):
    backend, corrupt, fname, says = CORRUPTIONS[case]
    run = shutil.copytree(onnx_run, tmp_path / "run")
    corrupt(run, lite0_run)
    with pytest.raises(BadModelFileError, match=says) as e:
        load_model(run, backend=backend, device="cpu")
    assert isinstance(e.value, ValueError) and fname in str(e.value)
    code, _, err = _predict_cli([run, SAMPLE_PHOTOS[0], "--backend", backend], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fname in lines[0] and says in lines[0]
    from fastlesson.app import app_main

    assert app_main([str(run), "--backend", backend]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and fname in err and says in err


@pytest.mark.parametrize("tfm", [Resize(32), Resize((24, 40)), Resize(32, method="squish"),
                                 Resize(32, method="pad", pad_mode="zeros"), Resize(40, method="pad"),
                                 RandomResizedCrop(32, val_xtra=0.14), RandomResizedCrop((28, 36))],
                         ids=["crop", "crop-nonsquare", "squish", "pad-zeros", "pad-reflect", "rrc", "rrc-nonsquare"])
def test_fast_preprocessing_is_fastais_validation_resize(tfm):
    """The PIL-only resize (both backends, the Space) equals fastai's validation transform, pixel for pixel."""
    from fastlesson.space_app import resize_image

    class _Dls:  # just what preprocessing_spec reads
        valid = type("V", (), {"after_item": type("F", (), {"fs": [tfm]})()})()
        after_batch = type("F", (), {"fs": []})()

    spec = preprocessing_spec(type("L", (), {"dls": _Dls()})())["resize"]
    for f in SAMPLE_PHOTOS[:6]:
        img = load_rgb(f)
        want = np.asarray(tfm(PILImage(img), split_idx=1))
        assert np.array_equal(np.asarray(resize_image(img, spec)), want)


def test_predict_script_truncated_weights_one_line(onnx_run, tmp_path):
    """The issue's case: a truncated model.safetensors used to end scripts/predict.py in a traceback."""
    import subprocess
    import sys

    run = shutil.copytree(onnx_run, tmp_path / "run")
    _truncate(run / BUNDLE_WEIGHTS, keep=0.3)
    script = Path(__file__).resolve().parents[1] / "scripts" / "predict.py"
    res = subprocess.run([sys.executable, str(script), str(run), str(SAMPLE_PHOTOS[0]), "--backend", "torch"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    last = [ln for ln in res.stderr.splitlines() if not ln.lstrip().startswith(("warnings.warn", "/"))]
    assert len(last) == 1 and last[0].startswith("error: ") and BUNDLE_WEIGHTS in last[0]
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- loading a trusted pickle: the device


@pytest.mark.parametrize("device, on_cpu", [(None, True), ("cpu", True), ("cuda", False)])
def test_trusted_pickle_loads_on_cpu_unless_a_gpu_is_asked_for(exported, monkeypatch, device, on_cpu):
    """On a machine with a GPU, export.pkl still opens on the CPU unless device='cuda' asks for it
    (a GPU is faked: load_learner's `cpu` argument and the predictor's device are what is checked)."""
    import fastai.learner

    _, out, _, _ = exported
    real, asked = fastai.learner.load_learner, []

    class _Stop(Exception):
        pass

    def spy(fname, cpu=True, **kw):
        asked.append(cpu)
        if not cpu:  # this machine has no GPU to load onto
            raise _Stop
        return real(fname, cpu=True, **kw)

    monkeypatch.setattr(fastai.learner, "load_learner", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        m = load_model(out / "export.pkl", trust_pickle=True, device=device)
    except _Stop:
        m = None
    assert asked == [on_cpu]
    if on_cpu:
        assert m.device == torch.device("cpu") and next(m.model.parameters()).device == torch.device("cpu")


# ---------------------------------------------------------------- predict_files: same as predict


def _big_jpegs(d: Path, n=2) -> list[Path]:
    """JPEGs far larger than the model's input, so fast decoding (draft + reduce) changes the pixels."""
    rng = np.random.default_rng(1)
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n):
        arr = rng.integers(0, 255, (200, 240, 3), dtype=np.uint8)
        arr[:, : 60 + 40 * k] = (230, 30, 30)  # a red band: not symmetric, not noise only
        Image.fromarray(arr).save(d / f"big_{k}.jpg", quality=92)
        files.append(d / f"big_{k}.jpg")
    return files


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("decode_side", [None, 40], ids=["draft-decode", "draft-and-reduce"])
def test_predict_files_predicts_like_predict(exported, tmp_path, tta, decode_side):
    """predict_files decodes the files itself: the same fast decode (draft, and the reduction to the
    decode_side a load_data model records), the same TTA and the same probabilities as predict."""
    _, out, _, _ = exported
    run = tmp_path / "run"
    run.mkdir()
    for name in (BUNDLE_META, BUNDLE_WEIGHTS):
        shutil.copy(out / name, run / name)
    if decode_side is not None:  # the bundle of a from_folder learner records none
        _edit_meta(run, decode_side=decode_side)
    m = load_model(run, device="cpu")
    files = _big_jpegs(tmp_path / "imgs")
    want = m.predict(files, tta=tta)
    rows = list(predict_files(m, files, tta=tta, bs=4))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    for row, p in zip(rows, want):
        assert row["label"] == p.label and row["prob"] == pytest.approx(p.prob, abs=1e-6)
        assert row["top5"] == [[lab, pytest.approx(q, abs=1e-6)] for lab, q in p.top5]
    # the decode and the TTA matter at these sizes, so the comparison above can tell them apart
    full = m.probs([load_rgb(f) for f in files], tta=tta)
    other = m.probs(files, tta=not tta)
    for alt in (full, other):
        assert not torch.allclose(torch.tensor([r["prob"] for r in rows]), alt.max(1).values, atol=1e-4)


# ---------------------------------------------------------------- learner_tta


def _flip_tta_reference(learn, x: torch.Tensor) -> torch.Tensor:
    """mean(softmax(model(x)), softmax(model(x mirrored))), by hand."""
    model = learn.model.eval()
    with torch.no_grad():
        return (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2


@pytest.mark.parametrize("n", [None, 1, 5], ids=["valid", "one-item-dl", "five-item-dl"])
def test_learner_tta_is_flip_tta_of_probabilities(n):
    """Probabilities even when the loss carries no activation (plain nn.CrossEntropyLoss: fastai's
    get_preds would return logits), over `dl` when one is given."""
    learn = make_tiny_learner()
    x, y = learn.dls.valid_ds.tensors
    dl = None
    if n is not None:
        x, y = x[:n], y[:n]
        dl = learn.dls.valid.new(TensorDataset(x, y))
    probs, targs = learner_tta(learn, dl)
    assert torch.allclose(probs, _flip_tta_reference(learn, x), atol=1e-6)
    assert torch.equal(targs, y)


def test_learner_tta_on_an_empty_validation_set(exported):
    learn, _, _, _ = exported
    probs, targs = learner_tta(learn, learn.dls.valid.new(learn.dls.valid_ds.new_empty()))
    assert probs.shape == (0, 3) and probs.dtype == torch.float32
    assert targs.shape == (0,) and targs.dtype == torch.long


# ---------------------------------------------------------------- save_examples

ODD_CLASSES = {"St. John's-wort": 1, "a": 3, "x" * 45: 2}  # class -> validation images
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def _examples_learner(root: Path):
    """A fastai learner over root/train|valid/<class>; every validation image one solid colour, one of
    them bigger than the examples' 512 px."""
    k = 0
    for cls, n_valid in ODD_CLASSES.items():
        for split, n in (("train", 1), ("valid", n_valid)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (600, 540) if (split, cls, i) == ("valid", "a", 1) else (48, 36)
                Image.new("RGB", size, COLOURS[k % len(COLOURS)]).save(root / split / cls / f"img_{i}.jpg")
                k += 1
    dls = ImageDataLoaders.from_folder(root, train="train", valid="valid", item_tfms=Resize(SIZE), bs=4,
                                       num_workers=0, device="cpu")
    return Learner(dls, nn.Identity())


# (class index in the vocab, rank within the class) of each example: round robin in vocab order, and a
# class with fewer images drops out (S0 a0 x0 a1, then x1 a2)
@pytest.mark.parametrize("n, picks", [(4, [(0, 0), (1, 0), (2, 0), (1, 1)]),
                                      (10, [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (1, 2)])])
def test_save_examples_one_class_after_another(tmp_path, n, picks):
    learn = _examples_learner(tmp_path / "data")
    vocab = list(learn.dls.vocab)
    assert vocab == list(ODD_CLASSES)  # fastai's sorted vocab: 'S' < 'a' < 'x'
    by_class = {c: [f for f in learn.dls.valid_ds.items if f.parent.name == c] for c in vocab}
    labels = [vocab[c] for c, _ in picks]
    sources = [by_class[vocab[c]][r] for c, r in picks]
    safe = {"St. John's-wort": "St._John_s-wort", "a": "a", "x" * 45: "x" * 40}
    want = [f"{k:02d}_{safe[c]}.jpg" for k, c in enumerate(labels)]

    files = save_examples(learn, tmp_path / "run", n=n)
    dest = tmp_path / "run" / "examples"
    assert [f.name for f in files] == want and all(f.parent == dest for f in files)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*want, "examples.json"])  # no temp files
    listing = json.loads((dest / "examples.json").read_text())
    assert listing == [{"file": w, "label": c, "source": s.name} for w, c, s in zip(want, labels, sources)]
    for f, src in zip(files, sources):
        with Image.open(f) as got, Image.open(src) as orig:
            assert got.format == "JPEG"
            w, h = orig.size
            if max(w, h) > 512:  # shrunk to 512 px on the long side, aspect kept
                assert max(got.size) == 512 and abs(got.size[0] / got.size[1] - w / h) < 0.01
            else:
                assert got.size == orig.size
            colour = np.asarray(got.convert("RGB"), float).reshape(-1, 3).mean(0)
            assert np.abs(colour - np.asarray(orig.convert("RGB"), float).reshape(-1, 3).mean(0)).max() < 4


def test_save_examples_from_load_data(tmp_path):
    """load_data's items are a DataFrame of (path, label, is_valid): its paths and labels are used."""
    from fastlesson.data import load_data

    root = write_image_folder(tmp_path / "data", n_train=2, n_valid=2, size=(48, 36))
    data = load_data(root, size=SIZE, bs=4)
    files = save_examples(_namespace_learner(data.dls.valid_ds, data.dls.vocab), tmp_path / "run", n=3)
    listing = json.loads((tmp_path / "run" / "examples" / "examples.json").read_text())
    assert [f.name for f in files] == ["00_a.jpg", "01_b.jpg", "02_c.jpg"]
    assert [(e["label"], Path(e["source"]).suffix) for e in listing] == [("a", ".jpg"), ("b", ".jpg"), ("c", ".jpg")]


def _namespace_learner(valid_ds, vocab=("a", "b")):
    """What save_examples reads of a learner: dls.vocab and dls.valid_ds."""
    from types import SimpleNamespace

    return SimpleNamespace(dls=SimpleNamespace(vocab=list(vocab), valid_ds=valid_ds))


def _no_examples_cases(root: Path) -> dict:
    files = []
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / cls / "x.jpg")
        files.append(root / cls / "x.jpg")
    label = [parent_label, Categorize(vocab=["a", "b"])]
    return {
        "tensor dataset": TensorDataset(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])),
        "empty validation set": Datasets(files, tfms=[[PILImage.create], label], splits=[[0, 1], []]).valid,
        "no labels": Datasets(files, tfms=[[PILImage.create]]),
        "one pipeline (TfmdLists)": TfmdLists(files, [PILImage.create]),
    }


@pytest.mark.parametrize("case", ["tensor dataset", "empty validation set", "no labels", "one pipeline (TfmdLists)"])
def test_save_examples_none_without_labelled_image_files(tmp_path, case):
    ds = _no_examples_cases(tmp_path / "data")[case]
    assert save_examples(_namespace_learner(ds), tmp_path / "run") == []
    assert not (tmp_path / "run").exists()


def test_save_examples_label_from_the_last_pipeline(tmp_path):
    """With two inputs (a fastai Datasets of image, image, label), the label is the last pipeline's."""
    files = []
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "data" / cls / "x.jpg")
        files.append(tmp_path / "data" / cls / "x.jpg")
    ds = Datasets(files, tfms=[[PILImage.create], [PILImage.create], [parent_label, Categorize(vocab=["a", "b"])]],
                  n_inp=2)
    assert [f.name for f in save_examples(_namespace_learner(ds), tmp_path / "run")] == ["00_a.jpg", "01_b.jpg"]


def test_preprocessing_spec_without_normalize_is_plain_pixels():
    from types import SimpleNamespace

    from fastai.vision.augment import Normalize

    from fastlesson.export import preprocessing_spec

    def spec(after_batch):
        dls = SimpleNamespace(valid=SimpleNamespace(after_item=SimpleNamespace(fs=[Resize(32)])),
                              after_batch=SimpleNamespace(fs=after_batch), valid_ds=None)
        return preprocessing_spec(SimpleNamespace(dls=dls))

    plain = spec([])
    assert (plain["mean"], plain["std"], plain["decode_side"]) == ([0.0] * 3, [1.0] * 3, None)
    assert plain["resize"]["size"] == [32, 32]
    normed = spec([Normalize.from_stats([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], cuda=False)])
    np.testing.assert_allclose(normed["mean"], [0.5, 0.4, 0.3])
    np.testing.assert_allclose(normed["std"], [0.2, 0.25, 0.3])


def test_load_model_from_any_file_of_the_bundle(onnx_run):
    assert load_model(onnx_run / ONNX_FILE).backend == "onnx"
    assert load_model(onnx_run / BUNDLE_WEIGHTS, backend="torch").backend == "torch"
    assert load_model(onnx_run / BUNDLE_META, backend="onnx").backend == "onnx"
    for backend in ("onnx", "torch"):  # fast_decode reaches both predictors
        assert load_model(onnx_run, backend=backend).min_side is not None
        assert load_model(onnx_run, backend=backend, fast_decode=False).min_side is None


@pytest.mark.parametrize("edit, says", [(dict(n_out=5), "n_out=5 but 3"), (dict(arch=None), "lacks arch")])
def test_bad_model_json_names_its_path(onnx_run, tmp_path, edit, says):
    run = shutil.copytree(onnx_run, tmp_path / "run")
    meta = json.loads((run / BUNDLE_META).read_text())
    meta.update({k: v for k, v in edit.items() if v is not None})
    for k in (k for k, v in edit.items() if v is None):
        del meta[k]
    (run / BUNDLE_META).write_text(json.dumps(meta))
    with pytest.raises(BadModelFileError, match=says) as e:
        load_model(run, backend="torch")
    assert str(run / BUNDLE_META) in str(e.value)


def test_onnx_backend_refuses_a_pickle(exported):
    _, out, _, _ = exported
    with pytest.raises(ValueError, match="backend='onnx' needs a run folder with model.onnx"):
        load_model(out / "export.pkl", trust_pickle=True, backend="onnx")
