"""`fastlesson-predict` / `python scripts/predict.py`: predict image classes with a run's model.

    fastlesson-predict runs/flowers-tf_efficientnet_lite0-20250101-120000 photo.jpg more_photos/
    fastlesson-predict RUN_DIR photos/ --json --tta --backend onnx
    fastlesson-predict RUN_DIR/export.pkl photo.jpg --trust-pickle   # fastai's pickle, if you trust it

MODEL is a run folder (or its model.json): model.onnx on onnxruntime when the run has one
(--backend auto), else the safe bundle on PyTorch; nothing is unpickled. PATH may be images or
folders (searched recursively), predicted --bs at a time. CMYK, RGBA, palette, greyscale and
EXIF-rotated images are handled like their RGB equivalents. An unreadable image is reported and
the rest are still predicted; the exit code is 1 if nothing could be predicted, 2 for a bad
model (one `error:` line naming the file and what is wrong).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fastlesson.export import BACKENDS, PREDICT_BS, load_model, predict_files

__all__ = ["parse_predict_args", "predict_main"]


def parse_predict_args(argv: Sequence[str] | None = None, prog: str = "fastlesson-predict") -> argparse.Namespace:
    from fastlesson.cli import USAGE_ERROR, one_line

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(USAGE_ERROR, f"error: {one_line(message)}; see {self.prog} --help\n")

    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder or model.json (safe bundle); export.pkl only with --trust-pickle")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"path", "label", "prob", "top5": [[label, prob], ...]}')
    p.add_argument("--tta", action="store_true",
                   help="flip TTA: average the image and its mirror image (the recipe's 'with TTA' figure)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="onnx (onnxruntime), torch, or auto: onnx when the run has model.onnx")
    p.add_argument("--bs", type=int, default=PREDICT_BS, help="images per forward pass")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading fastai's export.pkl (unpickling runs code: only for files you trust)")
    return p.parse_args(argv)


def predict_main(argv: Sequence[str] | None = None, prog: str = "fastlesson-predict") -> int:
    """Predict every image named; print one line (or one JSON object) per image; exit status."""
    from fastlesson.cli import USAGE_ERROR, one_line

    a = parse_predict_args(argv, prog)
    if a.bs < 1:
        print(f"error: --bs {a.bs} must be at least 1", file=sys.stderr)
        return USAGE_ERROR
    try:
        model = load_model(a.model, trust_pickle=a.trust_pickle, backend=a.backend, threads=a.threads)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    n_ok = n_bad = 0
    for row in predict_files(model, a.paths, tta=a.tta, bs=a.bs):
        if "error" in row:
            n_bad += 1
            print(f"skipped {row['path']}: {row['error']}", file=sys.stderr)
            if a.json:
                print(json.dumps(row), flush=True)
            continue
        n_ok += 1
        if a.json:
            print(json.dumps(row), flush=True)
        else:
            alts = ", ".join(f"{lab} {p:.1%}" for lab, p in row["top5"][1:3])
            print(f"{row['path']}: {row['label']} ({row['prob']:.1%}){f'; then {alts}' if alts else ''}")
    if n_ok == 0:
        print(f"error: no image could be predicted ({n_bad} unreadable or missing)", file=sys.stderr)
        return 1
    return 0
