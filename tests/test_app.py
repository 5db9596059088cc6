"""The Gradio demo on a loopback port: gradio_client, a real headless Chromium, bad uploads, the Space.

The model is a tiny small_cnn trained for a few seconds on colour-coded image folders, so it gets
every validation image right and "the right label" is the true class, not just the model's guess.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.vision.all import ImageDataLoaders, Resize
from PIL import Image

from fastlesson.app import app_main, build_app, export_space, run_examples
from fastlesson.export import BUNDLE_META, export_bundle, export_onnx, load_model, save_examples
from fastlesson.smallcnn import small_cnn
from fastlesson.space_app import MAX_PIXELS, model_card

from _recipe_helpers import write_image_folder

SIZE = 32  # px
ARCH_KWARGS = {"channels": [8, 16], "fc": [16], "dropout": 0.0, "size": SIZE}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# without the networking flags Chromium keeps trying to reach the internet (DESIGN.md)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")
BAD_UPLOAD = "not an image this demo can read"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder: safe bundle, model.onnx, examples/, metrics.json, from a model that is always right."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    data = write_image_folder(tmp_path_factory.mktemp("data"), n_train=6, n_valid=3, size=(48, 40))
    dls = ImageDataLoaders.from_folder(data, train="train", valid="valid", item_tfms=Resize(SIZE), bs=6,
                                       num_workers=0, device="cpu", seed=0)
    learn = Learner(dls, small_cnn(3, **ARCH_KWARGS), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit(6, 3e-3)
        acc = float(learn.validate()[1])
    assert acc == 1.0, "the colour-coded fixture model must get every validation image right"
    out = tmp_path_factory.mktemp("run")
    export_bundle(learn, out, arch="small_cnn", extra={"arch_kwargs": ARCH_KWARGS, "data": str(data),
                                                      "accuracy": acc})
    assert export_onnx(learn, out)["ok"]
    save_examples(learn, out, n=3)
    (out / "metrics.json").write_text(json.dumps({"final": {"accuracy": acc, "accuracy_tta": acc,
                                                             "n_valid": 9}}))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(run_dir):
    """The app of `run_dir` on a loopback port; yields its URL."""
    demo = build_app(run_dir)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _examples(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "examples" / "examples.json").read_text())


def _bomb(path: Path) -> Path:
    """A tiny PNG whose header claims more pixels than MAX_PIXELS (zlib squeezes its zeros)."""
    side = int(MAX_PIXELS ** 0.5) + 100
    raw = zlib.compress(b"\x00" * ((side + 1) * side), 9)  # filter byte + one grey byte per pixel

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def _bad_uploads(d: Path, good: Path) -> dict[str, Path]:
    (d / "notes.jpg").write_text("a text file with an image name")
    data = good.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return {"not an image": d / "notes.jpg", "truncated": d / "truncated.jpg", "bomb": _bomb(d / "bomb.png")}


def test_examples_saved_one_class_after_another(run_dir):
    ex = _examples(run_dir)
    assert [e["label"] for e in ex] == ["a", "b", "c"]  # vocab order, one per class
    for e in ex:
        img = Image.open(run_dir / "examples" / e["file"])
        assert img.mode == "RGB" and max(img.size) <= 512
    assert [Path(p).name for p in run_examples(run_dir)] == [e["file"] for e in ex]


def test_model_card_from_run_files(run_dir):
    meta = json.loads((run_dir / BUNDLE_META).read_text())
    card = model_card(meta, {"final": {"accuracy": 0.913, "accuracy_tta": 0.925, "n_valid": 400}})
    assert "91.3%" in card and "92.5% with flip TTA" in card and "400 images" in card
    assert "a, b, c" in card and "small_cnn at 32x32 px" in card and meta["created"][:10] in card
    assert Path(meta["data"]).name in card


def test_app_predicts_examples_over_loopback(served, run_dir):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    predictor = load_model(run_dir, backend="onnx")
    for ex in _examples(run_dir):
        path = run_dir / "examples" / ex["file"]
        out = client.predict(handle_file(str(path)), api_name="/predict")
        assert out["label"] == ex["label"]  # the true class of that validation image
        got = {c["label"]: c["confidence"] for c in out["confidences"]}
        want = dict(predictor.predict(path)[0].top5)
        assert set(got) == set(want) and all(abs(got[k] - want[k]) < 1e-5 for k in want)


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(served, run_dir, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    good = run_dir / "examples" / _examples(run_dir)[0]["file"]
    expected = {"not an image": BAD_UPLOAD, "truncated": "damaged or truncated", "bomb": "megapixels"}
    for kind, path in _bad_uploads(tmp_path, good).items():
        with pytest.raises(AppError, match=expected[kind]):
            client.predict(handle_file(str(path)), api_name="/predict")
    assert client.predict(handle_file(str(good)), api_name="/predict")["label"] == "a"


def test_app_loads_no_pickle(run_dir, tmp_path, monkeypatch):
    """Only the safe bundle or model.onnx: a folder holding just export.pkl is refused."""
    import pickle

    (tmp_path / "export.pkl").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="model.json"):
        build_app(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("the app must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for backend in ("onnx", "torch"):
        assert build_app(run_dir, backend=backend) is not None


def test_app_command_errors_are_one_line(tmp_path, capsys):
    assert app_main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        app_main([str(tmp_path), "--backend", "tflite"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------- a real browser


def _browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    "apt-get install -y chromium chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_browser_upload_shows_top_label(served, run_dir, tmp_path):
    """Headless Chromium opens the page, uploads an image, reads the top label; screenshot saved."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ex = _examples(run_dir)[1]
    driver = _browser(tmp_path)
    shots = Path(os.environ.get("FASTLESSON_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(served)
        wait = WebDriverWait(driver, 120)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
        assert "Model card" in driver.find_element(By.TAG_NAME, "body").text
        upload.send_keys(str(run_dir / "examples" / ex["file"]))
        top = wait.until(lambda d: [e.text.strip() for e in d.find_elements(
            By.CSS_SELECTOR, "#top5 [data-testid='label-output-value']") if e.text.strip()])
        driver.save_screenshot(str(shots / "app_top_label.png"))
        assert top[0] == ex["label"]
        # a non-image upload: the message appears in the page and the page stays usable
        bad = _bad_uploads(tmp_path, run_dir / "examples" / ex["file"])["not an image"]
        driver.get(served)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
        upload.send_keys(str(bad))
        wait.until(lambda d: BAD_UPLOAD in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(shots / "app_bad_upload.png"))
    finally:
        driver.quit()
    assert (shots / "app_top_label.png").stat().st_size > 1000


# ---------------------------------------------------------------- Hugging Face Spaces folder


def test_export_space_folder(run_dir, tmp_path):
    dest = export_space(run_dir, tmp_path / "space")
    names = {p.name for p in dest.iterdir()}
    assert {"app.py", "requirements.txt", "README.md", "model.onnx", "model.json", "metrics.json",
            "examples"} <= names
    assert "model.safetensors" not in names and "export.pkl" not in names  # the Space serves ONNX only
    readme = (dest / "README.md").read_text()
    header = readme.split("---")[1]
    import gradio

    for line in ("sdk: gradio", "app_file: app.py", f"sdk_version: {gradio.__version__}"):
        assert line in header.splitlines()
    reqs = (dest / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} == {"gradio", "onnxruntime", "numpy", "pillow"}
    src = (dest / "app.py").read_text()
    assert "import torch" not in src and "fastlesson" not in src.split('"""', 2)[2].split("def ")[0]
    assert len(list((dest / "examples").glob("*.jpg"))) == 3
    with pytest.raises(ValueError, match="not empty"):
        export_space(run_dir, dest)
    assert app_main([str(run_dir), "--space", str(tmp_path / "space2")]) == 0
    assert (tmp_path / "space2" / "app.py").is_file()


def _wait_port(port: int, proc: subprocess.Popen, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the Space app exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the Space app did not listen on port {port} within {seconds} s")


@pytest.mark.slow
def test_space_runs_from_a_fresh_venv(run_dir, tmp_path):
    """python -m venv + pip install -r requirements.txt, then the Space's app.py predicts an example.

    Minutes the first time (pip's cache makes it quick after); needs the package index.
    """
    from gradio_client import Client, handle_file

    dest = export_space(run_dir, tmp_path / "space")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(dest / "requirements.txt")],
                         capture_output=True, text=True, timeout=1500)
    assert pip.returncode == 0, pip.stderr[-2000:]
    probe = subprocess.run([str(py), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0  # the Space's environment really has no torch (nor fastlesson)
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": ""}
    log = (tmp_path / "space.log").open("w")
    proc = subprocess.Popen([str(py), "app.py"], cwd=dest, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, 180)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for ex in json.loads((dest / "examples" / "examples.json").read_text()):
            out = client.predict(handle_file(str(dest / "examples" / ex["file"])), api_name="/predict")
            assert out["label"] == ex["label"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    shutil.rmtree(venv, ignore_errors=True)
