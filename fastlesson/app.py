"""A Gradio web demo for a trained run, and the same demo as a folder ready for Hugging Face Spaces.

    fastlesson-app runs/my-run                    # or: python scripts/app.py runs/my-run
    fastlesson-app runs/my-run --space space/     # write a Spaces folder instead of serving

The page (``fastlesson.space_app.build_demo``): upload, paste or drop an image (webcam where the
browser has one) -> the top-5 labels with probabilities; examples from the run's validation set
(``examples/``, written by ``save_examples``); a short model card from model.json and metrics.json.
It loads only the safe bundle or model.onnx, never a pickle. An upload that is not an image, a
truncated file or a decompression bomb gets a readable message in the page; the server keeps serving.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from fastlesson import space_app
from fastlesson._io import atomic_write_text
from fastlesson.export import (
    BACKENDS,
    BUNDLE_META,
    ONNX_FILE,
    _open_onnx,
    image_files,
    load_model,
    read_meta,
    write_json,
)

__all__ = ["app_main", "build_app", "export_space", "run_examples"]

DEFAULT_HOST = "127.0.0.1"  # loopback: pass --host 0.0.0.0 to serve the local network
DEFAULT_PORT = 7860  # gradio's usual port
METRICS = "metrics.json"
SPACE_REQUIREMENTS = ("gradio", "onnxruntime", "numpy", "pillow")


def run_examples(run_dir, n: int = space_app.N_EXAMPLES) -> list[Path]:
    """The run's example images: its examples/ folder, else the first image of `n` classes of the
    validation folder of the data recorded in model.json (runs made before save_examples)."""
    run_dir = Path(run_dir)
    found = [Path(p) for p in space_app.example_files(run_dir)]
    if found:
        return found[:n]
    data = read_meta(run_dir / BUNDLE_META).get("data")
    valid = Path(str(data)) / "valid" if data else None
    if valid is None or not valid.is_dir():
        return []
    firsts = [image_files([d])[:1] for d in sorted(p for p in valid.iterdir() if p.is_dir())]
    return [f[0] for f in firsts if f][:n]


def _card(run_dir: Path, meta: dict) -> str:
    metrics_path = run_dir / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    return space_app.model_card(meta, metrics)


def _title(meta: dict) -> str:
    data = Path(str(meta["data"])).name if meta.get("data") else "image"
    return meta.get("title") or f"{data} classifier ({meta['arch']})"


def build_app(run_dir, backend: str = "auto", threads: int | None = None):
    """The Gradio Blocks for the run in `run_dir` (model.onnx or the safe bundle; never a pickle)."""
    run_dir = Path(run_dir)
    if not (run_dir / BUNDLE_META).is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no {BUNDLE_META}; pass a run folder written by "
                                "scripts/recipe.py")
    predictor = load_model(run_dir, backend=backend, threads=threads)

    def predict_file(path) -> list[tuple[str, float]]:
        img = space_app.open_image(path, predictor.min_side, predictor.reduce)
        return predictor.predict([img])[0].top5

    examples = [str(p) for p in run_examples(run_dir)]
    return space_app.build_demo(predict_file, _title(predictor.meta), _card(run_dir, predictor.meta), examples)


def _space_readme(meta: dict, title: str, card: str, versions: dict) -> str:
    header = "\n".join(["---", f"title: {json.dumps(title[:60])}", "emoji: 🌼", "colorFrom: green",
                        "colorTo: blue", "sdk: gradio", f"sdk_version: {versions['gradio']}",
                        "app_file: app.py", "pinned: false", "license: apache-2.0", "---"])
    return (f"{header}\n\n# {title}\n\nAn image classifier trained with "
            "fastlesson (the fast.ai lesson-2 recipe on fastai), served from `model.onnx` "
            "with onnxruntime: no PyTorch needed.\n\n## Model card\n\n"
            f"{card}\n\nPreprocessing and class names are in `model.json`; `app.py` runs as is with "
            "`pip install -r requirements.txt && python app.py`.\n")


def export_space(run, dest, title: str | None = None) -> Path:
    """Write `dest`: a folder ready for Hugging Face Spaces (app.py, requirements.txt, README.md with the
    Spaces header, model.onnx, model.json, metrics, examples/). Needs the run's model.onnx."""
    import gradio
    import onnxruntime

    run, dest = Path(run), Path(dest)
    meta = read_meta(run / BUNDLE_META)
    onnx_path = run / (meta.get("onnx") or {}).get("file", ONNX_FILE)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{str(run)!r} has no {ONNX_FILE}: a Space serves the ONNX model; write it "
                                "with fastlesson.export_onnx(learn, run_dir) (or export_onnx(None, run_dir))")
    _open_onnx(onnx_path, meta, run / BUNDLE_META, threads=1)  # refuses a damaged or foreign file
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"dest={str(dest)!r} is not empty; pass a new folder for the Space")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, dest / ONNX_FILE)
    title = title or _title(meta)
    write_json(dest / BUNDLE_META, {**meta, "title": title})
    metrics_path = run / METRICS
    if metrics_path.is_file():
        write_json(dest / METRICS, {"final": json.loads(metrics_path.read_text()).get("final", {})})
    (dest / space_app.EXAMPLES_DIR).mkdir(exist_ok=True)
    for i, ex in enumerate(run_examples(run)):
        name = ex.name if ex.parent.name == space_app.EXAMPLES_DIR else f"{i:02d}_{ex.parent.name}{ex.suffix}"
        shutil.copyfile(ex, dest / space_app.EXAMPLES_DIR / name)
    listing = run / space_app.EXAMPLES_DIR / "examples.json"  # true labels, as save_examples wrote them
    if listing.is_file():
        shutil.copyfile(listing, dest / space_app.EXAMPLES_DIR / listing.name)
    shutil.copyfile(space_app.__file__, dest / "app.py")
    versions = {"gradio": gradio.__version__, "onnxruntime": onnxruntime.__version__}
    reqs = [f"gradio=={versions['gradio']}", f"onnxruntime=={versions['onnxruntime']}", "numpy", "pillow"]
    atomic_write_text(dest / "requirements.txt", "\n".join(reqs) + "\n")
    card = _card(run, meta)
    atomic_write_text(dest / "README.md", _space_readme(meta, title, card, versions))
    return dest


def parse_app_args(argv: Sequence[str] | None = None, prog: str = "fastlesson-app") -> argparse.Namespace:
    from fastlesson.cli import USAGE_ERROR, one_line

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(USAGE_ERROR, f"error: {one_line(message)}; see {self.prog} --help\n")

    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="run folder with model.json (+ model.onnx or model.safetensors)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="onnx (onnxruntime), torch, or auto: onnx when the run has model.onnx")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to serve on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--space", metavar="DEST", default=None,
                   help="write a Hugging Face Spaces folder to DEST instead of serving")
    return p.parse_args(argv)


def app_main(argv: Sequence[str] | None = None, prog: str = "fastlesson-app") -> int:
    """`fastlesson-app` / `python scripts/app.py`: serve the demo (or write a Space); exit status."""
    from fastlesson.cli import USAGE_ERROR, one_line

    a = parse_app_args(argv, prog)
    try:
        if a.space:
            dest = export_space(a.run, a.space)
            print(f"Space written to {dest}: upload that folder to a Gradio Space (app.py, "
                  "requirements.txt, README.md, model files, examples/)")
            return 0
        demo = build_app(a.run, backend=a.backend, threads=a.threads)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    demo.launch(server_name=a.host, server_port=a.port)
    return 0


if __name__ == "__main__":
    sys.exit(app_main())
