"""The shared fixtures themselves behave as the other tests assume."""

import http.client
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
from fastai.callback.schedule import fit_one_cycle as _fastai_fit_one_cycle  # noqa: F401  (patches Learner)
from PIL import Image

from fastlesson.loopback import LoopbackServer
from fastlesson.synthetic import DRAW_BACKGROUND, make_image_folder


def test_tiny_learner_has_three_groups_and_learns(tiny_learner):
    learn = tiny_learner()
    learn.create_opt()
    assert len(learn.opt.param_lists) == 3
    with learn.no_bar(), learn.no_logging():
        before = learn.validate()[0]
        learn.fit(3, 1e-2)
        after = learn.validate()[0]
    assert after < before


def test_image_folder_layouts(image_folder):
    root = image_folder(classes=("x", "y"), n_per_class=4)
    assert len(list((root / "train" / "x").glob("*.jpg"))) == 4
    flat = image_folder(name="flat", layout="flat", classes=("x", "y"), n_per_class=3)
    assert sorted(p.name for p in flat.iterdir()) == ["x", "y"]


# fastlesson.synthetic: the one home for synthetic image folders (tests, notebooks, the sweep smoke run)

def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_make_image_folder_layout_counts_and_format(tmp_path):
    root = make_image_folder(tmp_path / "d", ("x", "y"), n_train=3, n_valid=2, size=(20, 10),
                             valid_name="test", fmt="png")
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
    assert [len(list((root / s / c).glob("img_*.png"))) for s in ("train", "test") for c in "xy"] == [3, 3, 2, 2]
    with Image.open(root / "train" / "x" / "img_000.png") as im:
        assert (im.format, im.size, im.mode) == ("PNG", (20, 10), "RGB")
    flat = make_image_folder(tmp_path / "f", ("x", "y", "z"), n_train=2, layout="flat")
    assert sorted(str(p.relative_to(flat)) for p in flat.rglob("*.jpg")) == \
        [f"{c}/img_00{i}.jpg" for c in "xyz" for i in range(2)]


def test_make_image_folder_class_is_its_dominant_channel(tmp_path):
    """Pixel values, not just files: class i raises channel i % 3 by `level` over [0, noise) noise."""
    root = make_image_folder(tmp_path, ("r", "g", "b"), n_train=2, n_valid=0, size=16, fmt="png",
                             noise=80, level=150)
    for ci, cls in enumerate("rgb"):
        for path in (root / "train" / cls).iterdir():
            px = _pixels(path)
            assert px[..., ci].min() >= 150 and px[..., ci].max() < 230
            others = np.delete(px, ci, axis=2)
            assert others.max() < 80


def test_make_image_folder_is_reproducible_per_seed(tmp_path):
    a, b, c = (make_image_folder(tmp_path / n, n_train=2, n_valid=1, fmt="png", seed=s)
               for n, s in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_sweep_smoke_data_is_the_shared_folder(tmp_path):
    from fastlesson.sweep import make_smoke_data

    root = make_smoke_data(tmp_path / "s", n_classes=2, n_train=3, n_test=1, size=16)
    same = make_image_folder(tmp_path / "m", ["class0", "class1"], 3, 1, 16, valid_name="test",
                             fmt="png", noise=80, level=150)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert len(files) == 8 and all((root / f).read_bytes() == (same / f).read_bytes() for f in files)


def test_drawing_style_draws_each_class_on_its_background(tmp_path):
    root = make_image_folder(tmp_path, ("daisy", "horse", "mango"), n_train=2, size=96, layout="flat",
                             style="drawing")
    for cls, bg in DRAW_BACKGROUND.items():  # top-left corner: the background, shifted < 40 per channel
        for path in (root / cls).iterdir():
            assert np.abs(_pixels(path)[:4, :4].mean((0, 1)) - bg).max() < 42, path
        assert len({p.read_bytes() for p in (root / cls).iterdir()}) == 2  # random drawings, not copies


@pytest.mark.parametrize("kw, bad", [
    (dict(layout="nested"), "layout='nested'"),
    (dict(style="photo"), "style='photo'"),
    (dict(fmt="gif"), "fmt='gif'"),
    (dict(classes=("a", "a")), "no repeats"),
    (dict(n_train=0), "n_train=0"),
    (dict(style="drawing"), "classes must be among"),
    (dict(classes=("daisy",), style="drawing", size=(100, 80)), "square"),
])
def test_make_image_folder_rejects_bad_arguments(tmp_path, kw, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        make_image_folder(tmp_path, **kw)
    assert not any(tmp_path.iterdir())  # checked before anything is written


# fastlesson.loopback: the one home for the loopback image server (scrape tests, notebook 06)

def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_loopback_serves_routes_then_files_and_counts_hits(tmp_path):
    site = tmp_path / "site"
    (site / "cls").mkdir(parents=True)
    (site / "cls" / "0.jpg").write_bytes(b"\xff\xd8jpeg")
    (site / "notes.txt").write_text("not an image")
    (tmp_path / "secret.txt").write_text("outside the served folder")
    routes = {"/fixed": (201, {"X-Test": "1"}, b"fixed"),
              "/count": lambda query, n: (200, {}, f"{query}|{n}".encode())}
    with LoopbackServer(routes, folder=site) as server:
        assert server.base.startswith("http://127.0.0.1:")
        status, headers, body = _get(server.url("/fixed"))
        assert (status, headers["X-Test"], body) == (201, "1", b"fixed")
        assert [_get(server.url("/count?id=7"))[2] for _ in range(2)] == [b"id=7|1", b"id=7|2"]
        status, headers, body = _get(server.url("/cls/0.jpg?copy"))  # the query does not pick a file
        assert (status, headers["Content-Type"], body) == (200, "image/jpeg", b"\xff\xd8jpeg")
        assert _get(server.url("/notes.txt"))[1]["Content-Type"] == "text/plain"
        assert _get(server.url("/cls/missing.jpg"))[0] == 404
        conn = http.client.HTTPConnection("127.0.0.1", int(server.base.rsplit(":", 1)[1]), timeout=5)
        conn.request("GET", "/../secret.txt")  # sent as is: no client-side normalising
        assert conn.getresponse().status == 404
        conn.close()
        assert _get(server.url("/cls"))[0] == 404  # no directory listings
        assert server.hits["/count?id=7"] == 2 and server.hits["/cls/0.jpg?copy"] == 1


def test_loopback_streams_an_iterable_body_without_length():
    chunks = [b"ab", b"cd", b"ef"]
    with LoopbackServer({"/stream": (200, {}, chunks)}) as server:
        status, headers, body = _get(server.url("/stream"))
        assert (status, headers["Content-Length"], body) == (200, None, b"abcdef")
        assert _get(server.url("/other"))[0] == 404  # no folder: unknown routes are 404


def test_loopback_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        LoopbackServer(folder=tmp_path / "missing")
