"""Export a trained Learner (fastai's export.pkl and a safe safetensors bundle); load and predict.

The safe bundle is ``model.safetensors`` (weights) + ``model.json`` (arch, class names, image size,
validation resize, normalisation, library versions). ``load_model`` rebuilds it with
``fastlesson.models.build_model`` and never unpickles anything; a fastai ``.pkl`` is only opened
when the caller says it is trusted (fastai's ``load_learner`` always unpickles, which runs code).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from fastai.data.transforms import Normalize, image_extensions
from fastai.vision.augment import RandomResizedCrop, Resize
from PIL import Image, ImageOps

from fastlesson._io import atomic_write, atomic_write_text

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_META = "model.json"
BUNDLE_FORMAT = "fastlesson-bundle/1"
EXPORT_PKL = "export.pkl"
TOP_K = 5  # labels listed per prediction
PREDICT_BS = 32  # images per forward pass when predicting


class Prediction(NamedTuple):
    """One image's prediction: best label, its probability, and the top-5 (label, prob) pairs."""

    label: str
    prob: float
    top5: list[tuple[str, float]]


# ---------------------------------------------------------------- images


def load_rgb(src) -> Image.Image:
    """Open an image as RGB the way a person sees it: EXIF rotation applied, transparency on white."""
    if isinstance(src, Image.Image):
        img = src
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist; check the path")
        try:
            img = Image.open(path)
            img.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{str(path)!r} is not a readable image ({type(e).__name__}: {e})") from e
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency -> real alpha, composited below
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


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
    return {"resize": resize, "mean": mean, "std": std}


def _resize_tfm(spec: dict):
    """Rebuild the fastai validation resize transform from its spec (no pickle involved)."""
    r = spec["resize"]
    size = tuple(r["size"])
    if r["type"] == "Resize":
        return Resize(size, method=r["method"], pad_mode=r.get("pad_mode", "reflection"))
    if r["type"] == "RandomResizedCrop":
        return RandomResizedCrop(size, val_xtra=r["val_xtra"])
    raise ValueError(f"unknown resize type {r['type']!r} in model.json; expected Resize or RandomResizedCrop")


def _to_tensor(img: Image.Image, resize, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Validation transforms by hand: fastai resize (split_idx=1), [0, 1] floats, normalise."""
    img = resize(img, split_idx=1)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - mean) / std


def _versions() -> dict:
    """Library versions stored next to the weights (for the person who loads them a year later)."""
    import fastai
    import timm
    import torchvision

    from fastlesson import __version__
    return {"fastlesson": __version__, "fastai": fastai.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------- saving


def write_json(path, obj) -> Path:
    """Write `obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    return atomic_write_text(path, text)


def export_bundle(learn, out_dir, arch: str | None = None, extra: dict | None = None) -> Path:
    """Write the safe bundle (model.safetensors + model.json) for `learn` into `out_dir`."""
    from safetensors.torch import save_file

    arch = arch or getattr(learn, "arch_name", None)
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
            "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {})}
    return write_json(out_dir / BUNDLE_META, meta)


def export_learner(learn, path) -> Path:
    """fastai's `learn.export`, written atomically to `path` (for `load_learner` users)."""
    path = Path(path).absolute()  # fastai writes to learn.path / fname; an absolute fname wins
    return atomic_write(path, lambda p: learn.export(p))


# ---------------------------------------------------------------- loading and predicting


class Predictor:
    """A model ready to predict: `predict(images_or_paths, tta=False) -> list[Prediction]`."""

    def __init__(self, model: torch.nn.Module, classes: list[str], meta: dict, learn=None, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.classes, self.meta, self.learn = list(classes), meta, learn
        self.source = "pickle" if learn is not None else "bundle"
        self._resize = _resize_tfm(meta)
        self._mean = torch.tensor(meta["mean"]).view(3, 1, 1)
        self._std = torch.tensor(meta["std"]).view(3, 1, 1)

    def __repr__(self):
        return f"Predictor({self.meta.get('arch')!r}, {len(self.classes)} classes, from {self.source})"

    def _batch(self, imgs: list[Image.Image]) -> torch.Tensor:
        """Validation-transformed batch: fastai's own test_dl for a learner, our copy for a bundle."""
        if self.learn is not None:
            dl = self.learn.dls.test_dl(imgs, num_workers=0, bs=len(imgs))
            return torch.cat([b[0] for b in dl]).as_subclass(torch.Tensor)
        return torch.stack([_to_tensor(i, self._resize, self._mean, self._std) for i in imgs])

    @torch.no_grad()
    def probs(self, items, tta: bool = False, bs: int = PREDICT_BS) -> torch.Tensor:
        """Class probabilities, shape (n_images, n_classes); TTA = mean of image and its mirror."""
        out = []
        for i in range(0, len(items), bs):
            x = self._batch([load_rgb(o) for o in items[i:i + bs]]).to(self.device)
            p = self.model(x).float().softmax(-1)
            if tta:
                p = (p + self.model(x.flip(-1)).float().softmax(-1)) / 2
            out.append(p.cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def predict(self, items, tta: bool = False, bs: int = PREDICT_BS) -> list[Prediction]:
        """Predict images (paths or PIL images): best label, its probability, top-5 pairs."""
        if isinstance(items, (str, Path, Image.Image)):
            items = [items]
        items = list(items)
        res = []
        for p in self.probs(items, tta=tta, bs=bs):
            top = p.topk(min(TOP_K, len(self.classes)))
            pairs = [(self.classes[j], float(v)) for v, j in zip(top.values, top.indices)]
            res.append(Prediction(pairs[0][0], pairs[0][1], pairs))
        return res


def _bundle_meta_path(path: Path) -> Path | None:
    """model.json for a bundle folder, a model.json, or a model.safetensors; None if not a bundle."""
    if path.is_dir():
        return path / BUNDLE_META if (path / BUNDLE_META).is_file() else None
    if path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        return path.with_name(BUNDLE_META)
    return None


def load_model(path, trust_pickle: bool = False, device=None) -> Predictor:
    """Load a safe bundle (folder, model.json or model.safetensors); a fastai .pkl only if trusted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} does not exist; pass a run folder that holds "
                                f"{BUNDLE_META} + {BUNDLE_WEIGHTS} (written by scripts/recipe.py)")
    meta_path = _bundle_meta_path(path)
    if meta_path is not None:
        return _load_bundle(meta_path, device)
    pkl = path if path.is_file() else path / EXPORT_PKL
    if not pkl.is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no {BUNDLE_META} (safe bundle) and no {EXPORT_PKL}; "
                                "pass the folder that scripts/recipe.py wrote")
    if not trust_pickle:
        raise ValueError(f"refusing to unpickle {str(pkl)!r}: loading a pickle runs code from the file. "
                         f"Use the safe bundle ({BUNDLE_META} + {BUNDLE_WEIGHTS}) instead, or, only for a "
                         "file you made or trust, pass trust_pickle=True (--trust-pickle on the command line)")
    return _load_pickle(pkl, device)


def _load_bundle(meta_path: Path, device=None) -> Predictor:
    """Rebuild the architecture and load safetensors weights: no pickle anywhere."""
    from safetensors.torch import load_file

    from fastlesson.models import build_model

    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(meta_path)!r} is missing; a safe bundle needs {BUNDLE_META} "
                                f"next to {BUNDLE_WEIGHTS}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{str(meta_path)!r} is not a fastlesson bundle (format {meta.get('format')!r}, "
                         f"expected {BUNDLE_FORMAT!r}); re-export it with fastlesson.export_bundle")
    weights = meta_path.with_name(meta.get("weights", BUNDLE_WEIGHTS))
    if not weights.is_file():
        raise FileNotFoundError(f"weights {str(weights)!r} are missing next to {str(meta_path)!r}")
    model = build_model(meta["arch"], meta["n_out"], pretrained=False)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return Predictor(model, meta["classes"], meta, device=device)


def _load_pickle(pkl: Path, device=None) -> Predictor:
    """fastai's load_learner (unpickles: the caller has said the file is trusted)."""
    import warnings

    from fastai.learner import load_learner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's insecure-pickle warning: the caller opted in
        learn = load_learner(pkl, cpu=device in (None, "cpu") or not torch.cuda.is_available())
    meta = {"arch": getattr(learn, "arch_name", None), **preprocessing_spec(learn)}
    return Predictor(learn.model, [str(c) for c in learn.dls.vocab], meta, learn=learn,
                     device=device or "cpu")


def predict_files(predictor: Predictor, paths: Iterable, tta: bool = False,
                  bs: int = PREDICT_BS) -> Iterator[dict]:
    """Yield one dict per image file, in order: {path, label, prob, top5}, or {path, error}."""
    files = image_files(paths)
    for i in range(0, len(files), bs):
        rows, imgs = [], []
        for f in files[i:i + bs]:
            try:
                imgs.append(load_rgb(f))
                rows.append({"path": str(f)})
            except (FileNotFoundError, ValueError) as e:
                rows.append({"path": str(f), "error": str(e)})
        preds = iter(predictor.predict(imgs, tta=tta, bs=bs) if imgs else [])
        for row in rows:
            if "error" not in row:
                pred = next(preds)
                row.update(label=pred.label, prob=pred.prob, top5=[[lab, p] for lab, p in pred.top5])
            yield row
