"""Predict image classes with a model exported by scripts/recipe.py.

    python scripts/predict.py runs/flowers-tf_efficientnet_lite0-20250101-120000 photo.jpg more_photos/
    python scripts/predict.py RUN_DIR photos/ --json --tta
    python scripts/predict.py RUN_DIR/export.pkl photo.jpg --trust-pickle   # fastai's pickle, if you trust it

MODEL is a run folder (or its model.json): the safe bundle, loaded without unpickling anything.
PATH may be images or folders (searched recursively). CMYK, RGBA, palette, greyscale and
EXIF-rotated images are handled like their RGB equivalents. An unreadable file is reported and
the rest are still predicted; the exit code is non-zero only if nothing could be predicted.
"""

from __future__ import annotations

import argparse
import json
import sys

from fastlesson.export import load_model, predict_files


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder or model.json (safe bundle); export.pkl only with --trust-pickle")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"path", "label", "prob", "top5": [[label, prob], ...]}')
    p.add_argument("--tta", action="store_true", help="average the image and its mirror image")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading fastai's export.pkl (unpickling runs code: only for files you trust)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        model = load_model(a.model, trust_pickle=a.trust_pickle)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_ok = n_bad = 0
    for row in predict_files(model, a.paths, tta=a.tta):
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


if __name__ == "__main__":
    sys.exit(main())
