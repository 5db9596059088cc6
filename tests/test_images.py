"""load_rgb: EXIF rotation, transparency on white, clear errors, and JPEG draft decoding above min_side;
to_rgb / to_8bit: any PIL mode to RGB (alpha on white), 16-bit and float scaled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastlesson.images import draft_size, load_rgb, to_8bit, to_rgb

W, H = 4000, 3000  # a 12-megapixel camera photo


def _pattern(w: int, h: int) -> np.ndarray:
    """Smooth known colours: red ramps left to right, green top to bottom, blue is 255 in the left half."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    blue = np.where(np.arange(w)[None, :] < w // 2, 255.0, 0.0).repeat(h, 0)
    return np.stack([x, y, blue], -1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    Image.fromarray(_pattern(W, H)).save(d / "big.jpg", quality=95)
    return d / "big.jpg"


def _mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.mark.parametrize("min_side,expected", [(200, (500, 375)), (375, (500, 375)), (376, (1000, 750)),
                                               (750, (1000, 750)), (1500, (2000, 1500)), (1501, (W, H)),
                                               (5000, (W, H))])
def test_draft_decodes_at_smallest_scale_not_below_min_side(big, min_side, expected):
    img = load_rgb(big, min_side=min_side)
    assert img.mode == "RGB" and img.size == expected == draft_size((W, H), min_side)
    assert min(img.size) >= min(min_side, H)


def test_draft_colours_match_full_decode_then_resize(big):
    full = load_rgb(big)
    assert full.size == (W, H)
    small = load_rgb(big, min_side=200)
    ref = full.resize(small.size, Image.Resampling.BOX)
    assert _mean_abs(small, ref) < 2.0  # of 255: the decoder's 1/8 scale is a box filter too
    truth = Image.fromarray(_pattern(*small.size))
    assert _mean_abs(small, truth) < 3.0
    px = np.asarray(small)
    assert px[10, 10, 2] > 240 and px[10, -10, 2] < 15  # blue left half, none right
    assert px[10, 10, 0] < 15 and px[10, -10, 0] > 240  # red ramps left to right
    assert px[-10, 250, 1] > 240 and px[10, 250, 1] < 15  # green ramps top to bottom


def test_draft_respects_exif_rotation(tmp_path):
    up = Image.fromarray(_pattern(H, W))  # portrait as the viewer sees it: 3000 wide, 4000 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer rotates the stored pixels 90 degrees clockwise
    up.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rot.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "rot.jpg") as im:
        assert im.size == (W, H)  # stored landscape
    img = load_rgb(tmp_path / "rot.jpg", min_side=300)
    assert img.size == (375, 500) and min(img.size) >= 300
    assert _mean_abs(img, up.resize(img.size, Image.Resampling.BOX)) < 3.0
    assert load_rgb(tmp_path / "rot.jpg").size == (H, W)


def test_small_jpeg_keeps_full_size(tmp_path):
    Image.fromarray(_pattern(160, 120)).save(tmp_path / "s.jpg", quality=95)
    assert load_rgb(tmp_path / "s.jpg", min_side=200).size == (160, 120)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "s.jpg", min_side=200)),
                          np.asarray(load_rgb(tmp_path / "s.jpg")))


def test_non_jpeg_ignores_min_side(tmp_path):
    arr = _pattern(800, 600)
    Image.fromarray(arr).save(tmp_path / "p.png")
    img = load_rgb(tmp_path / "p.png", min_side=100)
    assert img.size == (800, 600) and np.array_equal(np.asarray(img), arr)


def _variants(d):
    """(path, expected RGB as a person sees it) for the modes that trip up a plain convert('RGB')."""
    up = Image.fromarray(_pattern(48, 32))
    out = {}
    up.convert("CMYK").save(d / "cmyk.jpg", quality=100)
    out["cmyk"] = (d / "cmyk.jpg", Image.open(d / "cmyk.jpg").convert("RGB"))
    rgba = up.convert("RGBA")
    alpha = np.zeros((32, 48), np.uint8)
    alpha[:, 24:] = 255  # left half fully transparent: its hidden colours must not show
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "rgba.png")
    on_white = np.asarray(up).copy()
    on_white[:, :24] = 255
    out["rgba"] = (d / "rgba.png", Image.fromarray(on_white))
    pal = up.quantize(16)
    pal.info["transparency"] = 0
    pal.save(d / "pal.png", transparency=0)
    lut = np.asarray(pal.getpalette()[:48], np.uint8).reshape(16, 3)
    idx = np.asarray(pal)
    ref = np.where((idx == 0)[..., None], 255, lut[idx]).astype(np.uint8)
    out["palette_transparent"] = (d / "pal.png", Image.fromarray(ref))
    up.convert("L").save(d / "grey.png")
    out["grey"] = (d / "grey.png", up.convert("L").convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6
    up.transpose(Image.Transpose.ROTATE_90).save(d / "exif.png", exif=exif)
    out["exif"] = (d / "exif.png", up)
    return out


@pytest.mark.parametrize("kind", ["cmyk", "rgba", "palette_transparent", "grey", "exif"])
@pytest.mark.parametrize("min_side", [None, 32])  # 32: no reduction of a 48x32 JPEG
def test_modes_open_as_a_person_sees_them(tmp_path, kind, min_side):
    path, rgb = _variants(tmp_path)[kind]
    got = load_rgb(path, min_side=min_side)
    assert got.mode == "RGB" and got.size == rgb.size
    assert np.array_equal(np.asarray(got), np.asarray(rgb))


def test_cmyk_jpeg_drafts_to_rgb(tmp_path):
    Image.fromarray(_pattern(800, 600)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    got = load_rgb(tmp_path / "c.jpg", min_side=100)
    assert got.mode == "RGB" and got.size == (200, 150) == draft_size((800, 600), 100)
    ref = Image.open(tmp_path / "c.jpg").convert("RGB").resize(got.size, Image.Resampling.BOX)
    assert _mean_abs(got, ref) < 3.0


def test_open_image_passes_through():
    img = Image.fromarray(_pattern(40, 30)).convert("RGBA")
    out = load_rgb(img, min_side=10)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rgb(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_rgb(tmp_path / "bad.jpg", min_side=100)
    Image.fromarray(_pattern(40, 30)).save(tmp_path / "ok.jpg")
    for bad in (0, -5, 2.5, True, "200"):
        with pytest.raises(ValueError, match="min_side"):
            load_rgb(tmp_path / "ok.jpg", min_side=bad)


def test_16_bit_and_float_images_are_scaled_not_clipped():
    a16 = np.array([[0, 257, 32896, 65535]])  # 0, 1, 128, 255 in 8 bits
    # every 16-bit layout PIL can hand over (big-endian TIFFs open as I;16B)
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")):
        im = Image.frombytes(mode, (4, 1), a16.astype(dtype).tobytes())
        assert np.asarray(to_rgb(to_8bit(im, [])))[0, :, 0].tolist() == [0, 1, 128, 255], mode
    a32 = Image.fromarray(np.array([[0, 257, 32896, 65535, -1000, 100_000]], np.int32), "I")
    assert np.asarray(to_rgb(to_8bit(a32)))[0, :, 0].tolist() == [0, 1, 128, 255, 0, 255]  # clipped, no wrap
    f = Image.fromarray(np.array([[-1.0, 0.0, 1.0, 2.0, 3.0]], np.float32), "F")  # no fixed range: stretched
    notes = []
    assert np.asarray(to_rgb(to_8bit(f, notes), notes))[0, :, 0].tolist() == [0, 64, 128, 191, 255]
    narrow = Image.fromarray(np.array([[0.0, 0.25, 0.5]], np.float32), "F")  # a range under 1 is stretched too
    assert np.asarray(to_rgb(to_8bit(narrow)))[0, :, 0].tolist() == [0, 128, 255]
    assert notes == ["16-bit->8-bit", "L->RGB"]
    flat = Image.fromarray(np.full((1, 3), 7.5, np.float32), "F")  # constant: no division by zero
    assert np.asarray(to_rgb(to_8bit(flat)))[0, :, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_white_opaque_ones_keep_their_colour(mode):
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = (200, 40, 40, 255)  # opaque red
    a[0, 1] = (200, 40, 40, 0)  # fully transparent
    a[1, 0] = (0, 0, 0, 128)  # half-transparent black over white -> mid grey
    im = Image.fromarray(a, "RGBA")
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "PA":
        im = im.convert("RGB").quantize(8).convert("PA")
        im.putalpha(Image.fromarray(a[..., 3]))
    notes = []
    out = np.asarray(to_rgb(im, notes)).astype(int)
    assert "alpha on white" in notes and out.shape == (2, 2, 3)
    assert out[0, 1].tolist() == [255, 255, 255]
    assert abs(out[1, 0] - 127).max() <= 2
    if mode == "RGBA":
        assert out[0, 0].tolist() == [200, 40, 40]
    assert out[0, 0].min() < 200  # not washed out to white


def test_palette_transparent_index_becomes_white():
    """A palette PNG's transparent index shows the page behind it (white), not the colour it stores."""
    a = np.zeros((2, 2), np.uint8)
    a[0, 1] = 1
    im = Image.fromarray(a, "P")
    im.putpalette([10, 10, 10, 200, 40, 40] + [0] * 762)
    im.info["transparency"] = 0  # index 0 (stored as near-black) is transparent
    notes = []
    out = np.asarray(to_rgb(im, notes)).astype(int)
    assert notes == ["palette->RGB", "alpha on white"]
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 40, 40]


def test_to_rgb_leaves_rgb_alone_and_clips_deep_images_that_skip_to_8bit():
    rgb = Image.fromarray(_pattern(8, 6))
    notes = []
    assert to_rgb(rgb, notes) is rgb and notes == []
    assert to_8bit(rgb) is rgb  # not a deep mode: unchanged
    a16 = Image.frombytes("I;16", (4, 1), np.array([[0, 257, 32896, 65535]]).astype("<u2").tobytes())
    assert np.asarray(to_rgb(a16))[0, :, 0].tolist() == [0, 255, 255, 255]  # PIL's clip, as load_rgb did
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    notes = []
    assert np.asarray(to_rgb(cmyk, notes))[0, 0].tolist() == [255, 0, 0] and notes == ["CMYK->RGB"]
