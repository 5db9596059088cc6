"""Gradio demo of one exported fastlesson model; needs only numpy, pillow, onnxruntime and gradio.

This file has two lives. Inside fastlesson it is the one definition of the prediction-time
preprocessing (fastai's validation resize redone in plain PIL, then normalisation in numpy), of flip
TTA and of the demo page, used by ``fastlesson.load_model`` (both backends) and ``fastlesson.app``.
``fastlesson.export_space`` copies it, unchanged, as the ``app.py`` of a Hugging Face Space, next to
``model.onnx``, ``model.json`` and ``examples/``; there it runs without fastlesson, fastai or torch:

    python app.py            # serves the folder it sits in (GRADIO_SERVER_NAME / _PORT are honoured)

Keep it that way: no import of fastlesson, fastai or torch at module level or below.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

TOP_K = 5  # labels shown per prediction
MAX_PIXELS = 50_000_000  # px; larger uploads are refused as decompression bombs before decoding
N_EXAMPLES = 6  # validation images copied into a run folder / Space for the demo's examples
EXAMPLES_DIR = "examples"
TTA = "flip"  # the one test-time augmentation: see flip_tta
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImageError(ValueError):
    """An upload or file that is not a usable image (not an image, truncated, too many pixels)."""


# ---------------------------------------------------------------- images


def decode_min_side(meta: dict) -> int:
    """Smallest short side (px) a decode may keep without losing detail the resize would use."""
    r = meta["resize"]
    w, h = r["size"]
    if r["type"] == "RandomResizedCrop":
        return max(w, h) + _val_xtra(w, h, r["val_xtra"])
    return max(w, h)


def check_pixels(img: Image.Image, name: str) -> None:
    """Refuse decompression bombs by their header size, before any pixel is decoded."""
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise BadImageError(f"{name} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the limit of "
                            f"{MAX_PIXELS / 1e6:.0f} (a decompression bomb?); resize it and try again")


def open_image(path, min_side: int | None = None, reduce: bool = False) -> Image.Image:
    """Open an image file as RGB as a person sees it (EXIF rotation, transparency on white).

    A JPEG is decoded at reduced scale (PIL's draft mode) while its short side stays >= `min_side`.
    Raises BadImageError with a readable message for anything that is not a complete image.
    """
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            check_pixels(img, name)
            full = img.size  # header size, before a drafted decode shrinks it
            if min_side:
                img.draft("RGB", (min_side, min_side))
            img.load()
    except BadImageError:
        raise
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{name} is not an image this demo can read ({type(e).__name__}); "
                            "upload a JPEG, PNG, WebP, GIF, BMP or TIFF photo") from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data inside a known format
        raise BadImageError(f"{name} is a damaged or truncated image ({e}); upload the complete file") from e
    return reduce_image(to_rgb(img), full, min_side) if reduce and min_side else to_rgb(img)


def reduce_image(img: Image.Image, full: tuple[int, int], side: int) -> Image.Image:
    """Short side down to `side` px (Lanczos), the size taken from the full-size header: the decode the
    model was trained on (fastlesson.images.load_rgb with min_side; this file stays self-contained)."""
    if (img.width >= img.height) != (full[0] >= full[1]):
        full = full[::-1]  # EXIF rotation by 90 degrees
    size = reduced_size(full, side)
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)


def reduced_size(full: tuple[int, int], side: int) -> tuple[int, int]:
    """(w, h) of a `full`-sized image with its short side at `side` px (aspect kept); `full` if not larger."""
    w, h = full
    if min(w, h) <= side:
        return w, h
    return (max(side, round(w * side / h)), side) if w >= h else (side, max(side, round(h * side / w)))


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF rotation applied, palette transparency and alpha composited on white, then RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


# ---------------------------------------------------------------- preprocessing


def _val_xtra(w: int, h: int, val_xtra: float) -> int:
    """fastai RandomResizedCrop's validation margin: a multiple of 8 px."""
    return math.ceil(max(w, h) * val_xtra / 8) * 8


_PAD_MODES = {"zeros": "constant", "reflection": "reflect", "border": "edge"}


def _crop_pad(img: Image.Image, box: tuple[int, int, int, int], pad_mode: str) -> Image.Image:
    """fastai's crop_pad for a (left, top, width, height) box that may reach outside the image."""
    left, top, cw, ch = box
    w, h = img.size
    inside = img.crop((max(left, 0), max(top, 0), min(left + cw, w), min(top + ch, h)))
    pads = (max(-left, 0), max(-top, 0), max(left + cw - w, 0), max(top + ch - h, 0))
    if not any(pads):
        return inside
    arr = np.pad(np.asarray(inside), ((pads[1], pads[3]), (pads[0], pads[2]), (0, 0)),
                 mode=_PAD_MODES.get(pad_mode, "reflect"))
    return Image.fromarray(arr)


def resize_image(img: Image.Image, resize: dict) -> Image.Image:
    """fastai's validation resize (split_idx=1) in plain PIL, pixel for pixel.

    `resize` is model.json's "resize": Resize (method crop / pad / squish, centred) or
    RandomResizedCrop (squish to size + val_xtra margin, then a centre crop). Sizes are (w, h).
    """
    sw, sh = resize["size"]
    if resize["type"] == "RandomResizedCrop":
        xtra = _val_xtra(sw, sh, resize["val_xtra"])
        fw, fh = sw + xtra, sh + xtra
        img = img.resize((fw, fh), Image.BILINEAR)
        left, top = (fw - sw) // 2, (fh - sh) // 2
        return img.crop((left, top, left + sw, top + sh))
    if resize["type"] != "Resize":
        raise ValueError(f"unknown resize type {resize['type']!r} in model.json; expected Resize or "
                         "RandomResizedCrop")
    method = resize.get("method", "crop")
    if method == "squish":
        return img.resize((sw, sh), Image.BILINEAR)
    w, h = img.size
    m = (min if method == "crop" else max)(w / sw, h / sh)
    cw, ch = int(m * sw), int(m * sh)
    box = (int(0.5 * (w - cw)), int(0.5 * (h - ch)), cw, ch)
    return _crop_pad(img, box, resize.get("pad_mode", "reflection")).resize((sw, sh), Image.BILINEAR)


class Preprocess:
    """RGB images -> the model's float32 NCHW input: validation resize, [0, 1], normalise."""

    def __init__(self, meta: dict):
        self.resize = meta["resize"]
        self.mean = np.asarray(meta["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(meta["std"], np.float32).reshape(3, 1, 1)
        w, h = self.resize["size"]
        self.shape = (3, h, w)

    def __call__(self, imgs: Sequence[Image.Image]) -> np.ndarray:
        out = np.empty((len(imgs), *self.shape), np.float32)
        for i, img in enumerate(imgs):
            arr = np.asarray(resize_image(img, self.resize), dtype=np.uint8)
            out[i] = (arr.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def flip_tta(probs_fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """fastlesson's TTA ("flip"): the mean of the softmax of the validation-transformed image and of
    its horizontal mirror. Deterministic, two forward passes; the same for every backend and for
    ``fastlesson.learner_tta`` (the recipe's "with TTA" figure)."""
    return (probs_fn(x) + probs_fn(np.ascontiguousarray(x[..., ::-1]))) / 2


def top_k(probs: np.ndarray, classes: Sequence[str], k: int = TOP_K) -> list[tuple[str, float]]:
    """The k most likely (label, probability) pairs, most likely first."""
    idx = np.argsort(-probs, kind="stable")[: min(k, len(classes))]
    return [(classes[j], float(probs[j])) for j in idx]


# ---------------------------------------------------------------- onnxruntime


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_session(path, threads: int | None = None):
    """An onnxruntime CPU session: all graph optimisations, `threads` intra-op threads (None: ORT's)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxClassifier:
    """model.onnx + model.json -> probabilities; the Space's whole model, no torch needed."""

    def __init__(self, folder, threads: int | None = None):
        folder = Path(folder)
        self.meta = json.loads((folder / "model.json").read_text())
        self.classes = [str(c) for c in self.meta["classes"]]
        self.session = onnx_session(folder / self.meta["onnx"]["file"], threads)
        self.input = self.session.get_inputs()[0].name
        self.preprocess = Preprocess(self.meta)
        self.min_side = self.meta.get("decode_side") or decode_min_side(self.meta)
        self.reduce = bool(self.meta.get("decode_side"))  # as the training pipeline did

    def logits_probs(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.session.run(None, {self.input: x})[0])

    def predict_file(self, path, tta: bool = False) -> list[tuple[str, float]]:
        x = self.preprocess([open_image(path, self.min_side, self.reduce)])
        p = flip_tta(self.logits_probs, x) if tta else self.logits_probs(x)
        return top_k(p[0], self.classes)


# ---------------------------------------------------------------- the page


def model_card(meta: dict, metrics: dict | None = None) -> str:
    """A short Markdown model card: data, classes, accuracy, date, architecture."""
    final = (metrics or {}).get("final", {})
    classes = [str(c) for c in meta.get("classes", [])]
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes)} in all)" if len(classes) > 8 else "")
    acc = final.get("accuracy", meta.get("accuracy"))
    acc_txt = "not recorded" if acc is None else f"{100 * acc:.1f}%"
    if final.get("accuracy_tta") is not None:
        acc_txt += f" ({100 * final['accuracy_tta']:.1f}% with flip TTA)"
    n_valid = final.get("n_valid")
    w, h = meta.get("resize", {}).get("size", meta.get("size", ["?", "?"]))
    data = Path(str(meta["data"])).name if meta.get("data") else "not recorded"
    rows = [("Data", data), ("Classes", shown or "?"),
            ("Validation accuracy", acc_txt + (f" on {n_valid} images" if n_valid else "")),
            ("Model", f"{meta.get('arch', '?')} at {w}x{h} px"),
            ("Trained", str(meta.get("created", "not recorded"))[:10])]
    return "\n".join(f"- **{k}:** {v}" for k, v in rows)


def example_files(folder) -> list[str]:
    """The demo's example images (folder/examples/*), sorted."""
    d = Path(folder) / EXAMPLES_DIR
    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
    return sorted(str(p) for p in d.iterdir() if p.suffix.lower() in exts) if d.is_dir() else []


def _checked_image(**kw):
    """gr.Image whose upload check turns an unreadable file into a readable message in the page.

    Its preprocess is wrapped on the instance: a gr.Image subclass would make gradio write a .pyi
    stub next to this file (gradio does that for every component class defined outside gradio).
    """
    import gradio as gr

    image = gr.Image(**kw)
    preprocess = image.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            name = Path(getattr(payload, "orig_name", None) or "the upload").name
            raise gr.Error(f"{name} is not an image this demo can read ({type(e).__name__}); "
                           "upload a JPEG, PNG, WebP, GIF, BMP or TIFF photo") from e

    image.preprocess = checked
    return image


def build_demo(predict_file: Callable[[str], list[tuple[str, float]]], title: str, card: str,
               examples: Sequence[str] = ()):
    """The page: image in (upload, paste, webcam) -> top-5 labels, examples, model card."""
    import gradio as gr

    def classify(path):
        if path is None:
            raise gr.Error("No image yet: upload, paste or drop a photo, or pick an example")
        try:
            return dict(predict_file(path))
        except BadImageError as e:
            raise gr.Error(str(e)) from e

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nUpload, paste or drop a photo (or use the webcam) to see the five most "
                    "likely classes.")
        with gr.Row():
            with gr.Column():
                image = _checked_image(type="filepath", image_mode=None, label="Image",
                                       sources=["upload", "clipboard", "webcam"], elem_id="input-image")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                label = gr.Label(num_top_classes=TOP_K, label="Top 5", elem_id="top5")
        if examples:  # a click shows the example's prediction at once (not cached: Spaces would cache)
            gr.Examples(examples=[[e] for e in examples], inputs=image, outputs=label, fn=classify,
                        run_on_click=True, cache_examples=False, label="Examples from the validation set")
        gr.Markdown("## Model card\n" + card)
        button.click(classify, inputs=image, outputs=label, api_name="predict")
        image.upload(classify, inputs=image, outputs=label, api_name=False)
    return demo


def demo_from_folder(folder=None, threads: int | None = None):
    """The Space's demo: the ONNX model, examples and card of `folder` (default: this file's folder)."""
    folder = Path(folder or Path(__file__).resolve().parent)
    clf = OnnxClassifier(folder, threads)
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    title = clf.meta.get("title") or f"{clf.meta.get('arch', 'image')} classifier"
    return build_demo(clf.predict_file, title, model_card(clf.meta, metrics), example_files(folder))


if __name__ == "__main__":
    demo_from_folder().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
