"""Export a trained Learner (safe bundle, ONNX, fastai's export.pkl); load it with one of two backends.

The safe bundle is ``model.safetensors`` (weights) + ``model.json`` (arch, class names, image size,
validation resize, normalisation, library versions). ``export_onnx`` adds ``model.onnx`` (fixed
input size, any batch) and records in ``model.json`` how closely onnxruntime matched PyTorch.
``load_model(run, backend="auto"|"onnx"|"torch")`` gives a ``Predictor`` whose preprocessing (PIL +
numpy, ``fastlesson.space_app``) and flip TTA are the same on both backends; it never unpickles
anything. A fastai ``.pkl`` is only opened when the caller says it is trusted (fastai's
``load_learner`` always unpickles, which runs code). A damaged, truncated or mismatched model file
raises ``BadModelFileError`` (a ValueError) with one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.data.transforms import Normalize, image_extensions
from fastai.vision.augment import RandomResizedCrop, Resize
from PIL import Image

from fastlesson._io import atomic_write, write_json  # re-exported: fastlesson.export.write_json
from fastlesson.env import versions
from fastlesson.images import load_rgb  # re-exported: fastlesson.export.load_rgb stays importable
from fastlesson.space_app import (
    EXAMPLES_DIR,
    N_EXAMPLES,
    TTA,
    Preprocess,
    decode_min_side,
    file_sha256,
    flip_tta,
    onnx_session,
    softmax,
    top_k,
)

__all__ = [
    "BACKENDS", "BadModelFileError", "Prediction", "Predictor", "OnnxPredictor", "TorchPredictor",
    "TTA", "export_bundle", "export_learner", "export_onnx", "image_files", "learner_tta", "load_model",
    "load_rgb", "predict_files", "preprocessing_spec", "save_examples", "write_json",
]

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_META = "model.json"
BUNDLE_FORMAT = "fastlesson-bundle/1"
ONNX_FILE = "model.onnx"
EXPORT_PKL = "export.pkl"
BACKENDS = ("auto", "onnx", "torch")
TOP_K = 5  # labels listed per prediction
PREDICT_BS = 32  # images per forward pass when predicting
ONNX_CHECK_N = 16  # validation images run through both PyTorch and onnxruntime at export
ONNX_TOL = 1e-3  # max abs difference of probabilities accepted between onnxruntime and PyTorch
EXAMPLE_MAX_SIDE = 512  # px; example images are shrunk to this for the demo and the Space
META_KEYS = ("arch", "n_out", "classes", "resize", "mean", "std")


class Prediction(NamedTuple):
    """One image's prediction: best label, its probability, and the top-5 (label, prob) pairs."""

    label: str
    prob: float
    top5: list[tuple[str, float]]


class BadModelFileError(ValueError):
    """A model file that is damaged, truncated or does not belong to the model described in model.json."""


# ---------------------------------------------------------------- images


def image_files(paths: Iterable) -> list[Path]:
    """Expand files and folders (recursively, image extensions only) into a sorted list of files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in image_extensions)
        else:
            out.append(p)  # named explicitly: always tried, and reported if missing or unreadable
    return out


# ---------------------------------------------------------------- preprocessing spec


def preprocessing_spec(learn) -> dict:
    """The validation resize and normalisation of `learn.dls`, as plain JSON-able values."""
    resize = None
    for t in learn.dls.valid.after_item.fs:
        if isinstance(t, Resize):
            resize = {"type": "Resize", "size": list(t.size), "method": str(t.method),
                      "pad_mode": str(t.pad_mode)}
        elif isinstance(t, RandomResizedCrop):
            resize = {"type": "RandomResizedCrop", "size": list(t.size), "val_xtra": float(t.val_xtra)}
    if resize is None:
        raise ValueError("learn.dls has no Resize/RandomResizedCrop item transform, so the bundle cannot "
                         "record the input size; build the DataLoaders with item_tfms=Resize(size)")
    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # no Normalize: the model saw plain [0, 1] pixels
    for t in learn.dls.after_batch.fs:
        if isinstance(t, Normalize) and t.mean is not None:
            mean = [float(v) for v in torch.as_tensor(t.mean).flatten().cpu()]
            std = [float(v) for v in torch.as_tensor(t.std).flatten().cpu()]
    return {"resize": resize, "mean": mean, "std": std, "decode_side": _decode_side(learn)}


def _decode_side(learn) -> int | None:
    """The short side fastlesson.data's ImageOpener reduces every image to before the item transforms
    (None for other pipelines, e.g. fastai's PILImage.create, which decode at full size)."""
    from fastlesson.data import ImageOpener

    tls = getattr(getattr(learn.dls, "valid_ds", None), "tls", None)
    for t in (tls[0].tfms.fs if tls else []):
        if isinstance(t, ImageOpener):
            return int(t.side)
    return None


# ---------------------------------------------------------------- saving


def _recorded_arch(learn) -> str | None:
    """The backbone name `create_learner` recorded (`fastlesson.models.ModelInfo`); None for other learners."""
    from fastlesson.models import model_info

    info = model_info(learn)
    # getattr: export.pkl files written before ModelInfo hold a plain Learner with an `arch_name`
    return info.arch if info else getattr(learn, "arch_name", None)


def export_bundle(learn, out_dir, arch: str | None = None, extra: dict | None = None) -> Path:
    """Write the safe bundle (model.safetensors + model.json) for `learn` into `out_dir`."""
    from safetensors.torch import save_file

    arch = arch or _recorded_arch(learn)
    if not arch:
        raise ValueError("export_bundle needs the architecture name: pass arch='tf_efficientnet_lite0' "
                         "(or build the learner with fastlesson.create_learner, which records it)")
    classes = [str(c) for c in learn.dls.vocab]
    out_dir = Path(out_dir)
    # clone: safetensors refuses tensors that share storage, and the bundle must be CPU float
    state = {k: v.detach().cpu().clone().contiguous() for k, v in learn.model.state_dict().items()}
    atomic_write(out_dir / BUNDLE_WEIGHTS, lambda p: save_file(state, str(p)))
    spec = preprocessing_spec(learn)
    meta = {"format": BUNDLE_FORMAT, "arch": arch, "n_out": len(classes), "classes": classes,
            "size": spec["resize"]["size"], **spec, "weights": BUNDLE_WEIGHTS,
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {})}
    return write_json(out_dir / BUNDLE_META, meta)


def export_learner(learn, path) -> Path:
    """fastai's `learn.export`, written atomically to `path` (for `load_learner` users)."""
    path = Path(path).absolute()  # fastai writes to learn.path / fname; an absolute fname wins
    return atomic_write(path, lambda p: learn.export(p))


# ---------------------------------------------------------------- ONNX


def _exportable_copy(model: torch.nn.Module, meta: dict) -> torch.nn.Module:
    """`model` rebuilt with timm's exportable layers (static SAME padding), same weights, on CPU."""
    import timm

    from fastlesson.models import build_model

    with timm.layers.set_layer_config(exportable=True):
        copy = build_model(meta["arch"], meta["n_out"], pretrained=False, arch_kwargs=meta.get("arch_kwargs"))
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    copy.load_state_dict(state, strict=True)
    return copy.eval()


def _torch_onnx_export(model: torch.nn.Module, dummy: torch.Tensor, path: Path) -> str:
    """torch.onnx.export with a dynamic batch axis: the TorchScript exporter (seconds for a CNN), else
    the dynamo exporter; returns which one wrote the file."""
    import warnings

    kw = {"input_names": ["input"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=17,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kw)
            return "torchscript"
        except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError):
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (dummy,), str(path), dynamo=True,
                              dynamic_shapes=({0: batch},), **kw)
            return "dynamo"


def _learner_check_inputs(learn, n: int) -> tuple[torch.Tensor, str] | None:
    """Up to `n` validation images, validation-transformed by fastai; None without a validation set."""
    if len(learn.dls.valid_ds) == 0:
        return None
    xs, got = [], 0
    for b in learn.dls.valid:
        xs.append(b[0].as_subclass(torch.Tensor).float().cpu()[: n - got])
        got += len(xs[-1])
        if got >= n:
            break
    return torch.cat(xs), "validation"


def _bundle_check_inputs(meta: dict, n: int) -> tuple[torch.Tensor, str] | None:
    """Up to `n` images of the recorded data's valid/ folder, preprocessed as the predictor does."""
    valid = Path(str(meta["data"])) / "valid" if meta.get("data") else None
    files = image_files([valid])[:n] if valid is not None and valid.is_dir() else []
    if not files:
        return None
    return torch.from_numpy(Preprocess(meta)([load_rgb(f) for f in files])), "validation"


@torch.no_grad()
def _torch_probs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        return model(x.to(device)).float().softmax(-1).cpu().numpy()
    finally:
        model.train(was)


def _export_and_check(model: torch.nn.Module, meta: dict, onnx_path: Path, check) -> dict:
    w, h = meta["resize"]["size"]
    holder = {}
    copy = _exportable_copy(model, meta)
    atomic_write(onnx_path, lambda p: holder.update(exporter=_torch_onnx_export(copy, torch.zeros(1, 3, h, w), p)))
    x, checked_on = check or (torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(0)), "random")
    session = onnx_session(onnx_path)
    p_ort = softmax(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    p_torch = _torch_probs(model, x)
    diff = float(np.abs(p_ort - p_torch).max())
    if not diff <= ONNX_TOL:
        raise RuntimeError(f"onnxruntime and PyTorch disagree on {len(x)} {checked_on} images: max abs "
                           f"difference of probabilities {diff:.2e} > {ONNX_TOL:g}")
    import onnxruntime

    return {"file": ONNX_FILE, "sha256": file_sha256(onnx_path), "input_shape": ["batch", 3, h, w],
            "exporter": holder["exporter"], "max_abs_diff": diff, "n_checked": len(x),
            "checked_on": checked_on, "top1_agreement": float((p_ort.argmax(1) == p_torch.argmax(1)).mean()),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def export_onnx(learn, out_dir, n_check: int = ONNX_CHECK_N) -> dict:
    """Write `out_dir`/model.onnx next to the bundle (export_bundle first) and check it against PyTorch.

    The input size is fixed (the bundle's validation size), the batch axis free. timm models are
    rebuilt with ``exportable=True`` layers and learn's weights. onnxruntime and PyTorch are compared
    on `n_check` validation images (max abs difference of probabilities, top-1 agreement), and the
    result is stored under "onnx" in model.json. `learn=None` exports the bundle's own weights
    (checked on the recorded data's valid/ images). Never raises for a model that cannot be
    exported: returns ``{"ok": False, "error": reason}`` (also recorded in model.json), no model.onnx.
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / BUNDLE_META
    meta = read_meta(meta_path)
    onnx_path = out_dir / ONNX_FILE
    start = time.perf_counter()
    try:
        if learn is None:
            model, check = _load_torch_model(meta, meta_path).eval(), _bundle_check_inputs(meta, n_check)
        else:
            model, check = learn.model, _learner_check_inputs(learn, n_check)
        info = _export_and_check(model, meta, onnx_path, check)
    except Exception as e:  # any exporter or runtime failure: the run keeps its safe bundle
        onnx_path.unlink(missing_ok=True)
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
        meta["onnx"] = {"error": reason}
        write_json(meta_path, meta)
        return {"ok": False, "error": reason, "path": None}
    info["seconds"] = round(time.perf_counter() - start, 2)
    meta["onnx"] = info
    write_json(meta_path, meta)
    return {"ok": True, "path": str(onnx_path), **info}


# ---------------------------------------------------------------- TTA and examples


class MirrorInputs(Callback):
    """Mirror every batch's images left to right: the second pass of flip TTA, run through
    ``get_preds`` so that a data-parallel run gathers it like any other prediction."""

    order = 1  # before the model sees the batch

    def before_batch(self):
        self.learn.xb = (self.xb[0].flip(-1), *self.xb[1:])


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return x.float().softmax(-1)


def learner_tta(learn, dl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, targets) over `dl` (default the validation DataLoader) with fastlesson's flip TTA:
    the mean of softmax(model(x)) and softmax(model(x mirrored)), x validation-transformed.

    The same definition as ``Predictor.probs(tta=True)`` on both backends (``space_app.flip_tta``);
    deterministic, unlike fastai's ``learn.tta`` (random augmented passes). Two ``get_preds``
    passes, so it works inside ``distrib_ctx`` too (predictions gathered from every process).
    """
    dl = learn.dls.valid if dl is None else dl
    if len(dl.dataset) == 0:
        return torch.empty(0, learn.dls.c), torch.empty(0, dtype=torch.long)
    plain, targs = learn.get_preds(dl=dl, act=_softmax)
    mirrored, _ = learn.get_preds(dl=dl, act=_softmax, cbs=[MirrorInputs()])
    return ((plain + mirrored) / 2).as_subclass(torch.Tensor), targs.as_subclass(torch.Tensor)


def _valid_items_and_labels(learn) -> list[tuple[Path, str]]:
    """(image file, true label) for each validation item that is a file; [] for tensor datasets."""
    ds = learn.dls.valid_ds
    items = getattr(ds, "items", None)
    if hasattr(items, "columns") and "path" in items.columns:  # load_data's DataFrame of (path, label, is_valid)
        items = list(items["path"])
    tls = getattr(ds, "tls", None)
    if items is None or tls is None or len(tls) < 2 or not len(items) or not isinstance(items[0], (str, Path)):
        return []
    vocab = [str(c) for c in learn.dls.vocab]
    return [(Path(items[i]), vocab[int(tls[-1][i])]) for i in range(len(items))]


def save_examples(learn, out_dir, n: int = N_EXAMPLES) -> list[Path]:
    """Copy `n` validation images (one class after another) into `out_dir`/examples/ for the demo.

    Files are named ``00_<label>.jpg``, shrunk to at most 512 px, and listed with their true
    labels in ``examples/examples.json``. Returns the files ([] when the validation set holds no
    image files).
    """
    by_class: dict[str, list[Path]] = {str(c): [] for c in learn.dls.vocab}  # in vocab order
    for path, label in _valid_items_and_labels(learn):
        by_class[label].append(path)
    picked: list[tuple[Path, str]] = []
    rank = 0
    while len(picked) < n and any(len(v) > rank for v in by_class.values()):
        picked += [(v[rank], lab) for lab, v in by_class.items() if len(v) > rank][: n - len(picked)]
        rank += 1
    dest = Path(out_dir) / EXAMPLES_DIR
    files, listing = [], []
    for k, (src, label) in enumerate(picked):
        img = load_rgb(src)
        img.thumbnail((EXAMPLE_MAX_SIDE, EXAMPLE_MAX_SIDE))
        f = dest / f"{k:02d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', label)[:40]}.jpg"
        files.append(atomic_write(f, lambda p, img=img: img.save(p, format="JPEG", quality=90)))
        listing.append({"file": f.name, "label": label, "source": src.name})
    if files:
        write_json(dest / "examples.json", listing)
    return files


# ---------------------------------------------------------------- loading and predicting


class Predictor:
    """A model ready to predict: `predict(images_or_paths, tta=False) -> list[Prediction]`.

    Preprocessing (PIL resize + numpy, JPEG draft decoding) and flip TTA are shared by both
    backends; subclasses only map a float32 NCHW batch to probabilities.
    """

    backend = "?"

    def __init__(self, classes: list[str], meta: dict, fast_decode: bool = True):
        self.classes, self.meta = [str(c) for c in classes], meta
        self.source = "bundle"
        self._preprocess = Preprocess(meta)
        self.min_side = (meta.get("decode_side") or decode_min_side(meta)) if fast_decode else None
        self.reduce = bool(fast_decode and meta.get("decode_side"))  # as the training pipeline did

    def __repr__(self):
        return (f"{type(self).__name__}({self.meta.get('arch')!r}, {len(self.classes)} classes, "
                f"backend {self.backend!r}, from {self.source})")

    def batch_probs(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for a preprocessed float32 (n, 3, h, w) batch."""
        raise NotImplementedError

    def inputs(self, items) -> np.ndarray:
        """The validation-transformed float32 batch for images or paths."""
        return self._preprocess([load_rgb(o, self.min_side, self.reduce) for o in items])  # training's decode

    def probs(self, items, tta: bool = False, bs: int = PREDICT_BS) -> torch.Tensor:
        """Class probabilities, shape (n_images, n_classes); `tta`: flip TTA (space_app.flip_tta)."""
        items = list(items)
        out = []
        for i in range(0, len(items), bs):
            x = self.inputs(items[i:i + bs])
            out.append(flip_tta(self.batch_probs, x) if tta else self.batch_probs(x))
        if not out:
            return torch.empty(0, len(self.classes))
        return torch.from_numpy(np.concatenate(out).astype(np.float32))

    def predict(self, items, tta: bool = False, bs: int = PREDICT_BS) -> list[Prediction]:
        """Predict images (paths or PIL images): best label, its probability, top-5 pairs."""
        if isinstance(items, (str, Path, Image.Image)):
            items = [items]
        res = []
        for p in self.probs(items, tta=tta, bs=bs).numpy():
            pairs = top_k(p, self.classes, TOP_K)
            res.append(Prediction(pairs[0][0], pairs[0][1], pairs))
        return res


class TorchPredictor(Predictor):
    """The PyTorch backend: the rebuilt model (or a trusted fastai learner)."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, classes, meta: dict, learn=None, device=None,
                 fast_decode: bool = True):
        super().__init__(classes, meta, fast_decode=fast_decode)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.learn = learn
        self.source = "pickle" if learn is not None else "bundle"

    def inputs(self, items) -> np.ndarray:
        if self.learn is None:
            return super().inputs(items)
        # a trusted fastai learner: fastai's own test_dl, exactly what it does at validation
        # (paths go through the learner's own opener, as in training; images enter as fastai PILImages)
        from fastai.vision.core import PILImage

        items = [Path(o) if isinstance(o, (str, Path)) else PILImage.create(load_rgb(o, self.min_side, self.reduce)) for o in items]
        dl = self.learn.dls.test_dl(items, num_workers=0, bs=len(items))
        return torch.cat([b[0] for b in dl]).as_subclass(torch.Tensor).cpu().numpy()

    @torch.no_grad()
    def batch_probs(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(x).to(self.device)).float().softmax(-1).cpu().numpy()


class OnnxPredictor(Predictor):
    """The onnxruntime backend: model.onnx with all graph optimisations, `threads` intra-op threads."""

    backend = "onnx"

    def __init__(self, session, classes, meta: dict, fast_decode: bool = True):
        super().__init__(classes, meta, fast_decode=fast_decode)
        self.session = session
        self._input = session.get_inputs()[0].name

    def batch_probs(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.session.run(None, {self._input: x})[0])


def _bundle_meta_path(path: Path) -> Path | None:
    """model.json for a bundle folder, a model.json, a model.safetensors or model.onnx; None if not a bundle."""
    if path.is_dir():
        return path / BUNDLE_META if (path / BUNDLE_META).is_file() else None
    if path.suffix == ".json":
        return path
    if path.suffix in (".safetensors", ".onnx"):
        return path.with_name(BUNDLE_META)
    return None


def load_model(path, trust_pickle: bool = False, device=None, backend: str = "auto",
               threads: int | None = None, fast_decode: bool = True) -> Predictor:
    """Load a run's model: the safe bundle on PyTorch or model.onnx on onnxruntime; a .pkl only if trusted.

    `backend`: "auto" (onnxruntime when the run has model.onnx and onnxruntime is installed, else
    PyTorch), "onnx" or "torch". `threads`: onnxruntime intra-op threads (None: its default).
    `fast_decode`: decode JPEGs at 1/2, 1/4 or 1/8 scale while they stay above the model's input size
    (PIL draft mode; several times faster on big photos, pixels differ slightly from a full decode).
    A damaged or mismatched file raises BadModelFileError (a ValueError) naming the file.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; use one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} does not exist; pass a run folder that holds "
                                f"{BUNDLE_META} + {BUNDLE_WEIGHTS} (written by scripts/recipe.py)")
    meta_path = _bundle_meta_path(path)
    if meta_path is not None:
        return _load_bundle(meta_path, device, backend=backend, threads=threads, fast_decode=fast_decode)
    pkl = path if path.is_file() else path / EXPORT_PKL
    if not pkl.is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no {BUNDLE_META} (safe bundle) and no {EXPORT_PKL}; "
                                "pass the folder that scripts/recipe.py wrote")
    if not trust_pickle:
        raise ValueError(f"refusing to unpickle {str(pkl)!r}: loading a pickle runs code from the file. "
                         f"Use the safe bundle ({BUNDLE_META} + {BUNDLE_WEIGHTS}) instead, or, only for a "
                         "file you made or trust, pass trust_pickle=True (--trust-pickle on the command line)")
    if backend == "onnx":
        raise ValueError(f"backend='onnx' needs a run folder with {ONNX_FILE}, not the pickle {str(pkl)!r}")
    return _load_pickle(pkl, device)


def read_meta(meta_path) -> dict:
    """model.json as a dict, or BadModelFileError naming the file and what is wrong with it."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(meta_path)!r} is missing; a safe bundle needs {BUNDLE_META} "
                                f"next to {BUNDLE_WEIGHTS} (write it with fastlesson.export_bundle)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadModelFileError(f"{str(meta_path)!r} is not valid JSON ({e}); re-export the bundle or "
                                "restore the file from the run folder") from e
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{str(meta_path)!r} is not a fastlesson bundle (format {got!r}, "
                         f"expected {BUNDLE_FORMAT!r}); re-export it with fastlesson.export_bundle")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise BadModelFileError(f"{str(meta_path)!r} lacks {', '.join(missing)}; re-export the bundle")
    if not isinstance(meta["classes"], list) or len(meta["classes"]) != meta["n_out"]:
        raise BadModelFileError(f"{str(meta_path)!r}: n_out={meta['n_out']!r} but {len(meta['classes'])} "
                                "classes are listed; re-export the bundle")
    return meta


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _load_bundle(meta_path: Path, device=None, backend: str = "torch", threads: int | None = None,
                 fast_decode: bool = True) -> Predictor:
    """Rebuild the architecture and load safetensors weights, or open model.onnx: no pickle anywhere."""
    meta = read_meta(meta_path)
    onnx_info = meta.get("onnx") or {}
    onnx_path = meta_path.with_name(onnx_info.get("file", ONNX_FILE))
    if backend == "auto":
        backend = "onnx" if onnx_path.is_file() and _onnx_available() else "torch"
    if backend == "onnx":
        return OnnxPredictor(_open_onnx(onnx_path, meta, meta_path, threads), meta["classes"], meta,
                             fast_decode=fast_decode)
    return TorchPredictor(_load_torch_model(meta, meta_path), meta["classes"], meta, device=device,
                          fast_decode=fast_decode)


def _load_torch_model(meta: dict, meta_path: Path) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fastlesson.models import build_model

    weights = meta_path.with_name(meta.get("weights", BUNDLE_WEIGHTS))
    if not weights.is_file():
        raise FileNotFoundError(f"weights {str(weights)!r} are missing next to {str(meta_path)!r}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise BadModelFileError(f"{str(weights)!r} is damaged or truncated ({type(e).__name__}: {e}); "
                                "copy the file again or re-export the bundle") from e
    model = build_model(meta["arch"], meta["n_out"], pretrained=False, arch_kwargs=meta.get("arch_kwargs"))
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise BadModelFileError(f"{str(weights)!r} does not fit arch {meta['arch']!r} with {meta['n_out']} "
                                f"classes from {str(meta_path)!r}: {problem}; the weights and model.json "
                                "come from different models")
    model.load_state_dict(state, strict=True)
    return model


def _state_mismatch(expected: dict, got: dict) -> str | None:
    """A one-line summary of how `got` (a state dict) fails to fit `expected`; None if it fits."""
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if not (missing or extra or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (first {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (first {extra[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of the wrong shape (first {k}: {tuple(got[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} expected)")
    return ", ".join(parts)


def _open_onnx(onnx_path: Path, meta: dict, meta_path: Path, threads: int | None):
    """An onnxruntime session for model.onnx, after checking it is the file export_onnx recorded."""
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{str(onnx_path)!r} does not exist: backend='onnx' needs the run's "
                                f"{ONNX_FILE} (fastlesson.export_onnx(learn, run_dir)); or use backend='torch'")
    if not _onnx_available():
        raise ValueError("backend='onnx' needs onnxruntime: pip install onnxruntime, or use backend='torch'")
    recorded = (meta.get("onnx") or {}).get("sha256")
    if recorded and file_sha256(onnx_path) != recorded:
        raise BadModelFileError(f"{str(onnx_path)!r} is not the model.onnx that was exported with "
                                f"{str(meta_path)!r} (its SHA-256 differs from the one recorded there); "
                                "it is damaged or from another model: re-export it with fastlesson.export_onnx")
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        InvalidGraph,
        InvalidProtobuf,
    )

    try:
        session = onnx_session(onnx_path, threads)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, RuntimeError) as e:
        raise BadModelFileError(f"{str(onnx_path)!r} is not a readable ONNX model ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:200]}); re-export it with "
                                "fastlesson.export_onnx") from e
    problem = _onnx_shape_problem(session, meta)
    if problem:
        raise BadModelFileError(f"{str(onnx_path)!r} does not match {str(meta_path)!r}: {problem}; it is "
                                "from another model: re-export it with fastlesson.export_onnx")
    return session


def _onnx_shape_problem(session, meta: dict) -> str | None:
    """Why the ONNX graph's input/output shapes cannot be this model's; None if they fit."""
    w, h = meta["resize"]["size"]
    inp, out = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    if len(inp) != 4 or list(inp[1:]) != [3, h, w]:
        return f"its input is {inp}, the model takes [batch, 3, {h}, {w}]"
    if len(out) != 2 or out[1] != meta["n_out"]:
        return f"its output is {out}, the model has {meta['n_out']} classes"
    return None


def _load_pickle(pkl: Path, device=None) -> Predictor:
    """fastai's load_learner (unpickles: the caller has said the file is trusted)."""
    import warnings

    from fastai.learner import load_learner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's insecure-pickle warning: the caller opted in
        learn = load_learner(pkl, cpu=device in (None, "cpu") or not torch.cuda.is_available())
    meta = {"arch": _recorded_arch(learn), **preprocessing_spec(learn)}
    return TorchPredictor(learn.model, [str(c) for c in learn.dls.vocab], meta, learn=learn,
                          device=device or "cpu")


def predict_files(predictor: Predictor, paths: Iterable, tta: bool = False,
                  bs: int = PREDICT_BS) -> Iterator[dict]:
    """Yield one dict per image file, in order: {path, label, prob, top5}, or {path, error}.

    Files are decoded and predicted `bs` at a time (one forward pass per batch).
    """
    files = image_files(paths)
    for i in range(0, len(files), bs):
        rows, imgs = [], []
        for f in files[i:i + bs]:
            try:
                imgs.append(load_rgb(f, predictor.min_side, predictor.reduce))
                rows.append({"path": str(f)})
            except (FileNotFoundError, ValueError) as e:
                rows.append({"path": str(f), "error": str(e)})
        preds = iter(predictor.predict(imgs, tta=tta, bs=bs) if imgs else [])
        for row in rows:
            if "error" not in row:
                pred = next(preds)
                row.update(label=pred.label, prob=pred.prob, top5=[[lab, p] for lab, p in pred.top5])
            yield row
