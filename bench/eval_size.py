"""Does a trained run predict better at a larger test-time input size? ("FixRes", Touvron et al. 2019)

RandomResizedCrop shows the model objects larger during training than the validation centre crop does,
so evaluating a little above the training size often gains accuracy for free (only inference costs more).
This bench loads a finished run's safe bundle (PyTorch backend: any input size), evaluates its
validation folder at each size with the run's own validation transform (Resize to size * (1 + val_xtra),
centre crop size), with and without flip TTA, and prints the accuracies side by side with the time per
image. The run's training size comes first: it must reproduce the recipe's own figure.

    python bench/eval_size.py --run runs/flowers_default --sizes 160 192 224
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, env_summary, resolve_data  # noqa: E402


def valid_items(data: Path) -> list[tuple[Path, str]]:
    """(image, label) for every file of data/valid/<class>/; the label is the folder's name in
    cat_to_name.json where the data set has one (as the recipe names the classes)."""
    names_json = data / "cat_to_name.json"
    names = json.loads(names_json.read_text()) if names_json.is_file() else {}
    return [(f, names.get(cls.name, cls.name)) for cls in sorted(p for p in (data / "valid").iterdir() if p.is_dir())
            for f in sorted(cls.iterdir()) if f.is_file()]


def at_size(predictor, size: int):
    """The predictor with its validation transform moved to `size` (full decode: no draft reduction)."""
    from fastlesson.space_app import Preprocess

    meta = json.loads(json.dumps(predictor.meta))
    meta["resize"]["size"] = [size, size]
    predictor._preprocess = Preprocess(meta)
    predictor.min_side, predictor.reduce = None, False
    return predictor


def accuracy(probs: np.ndarray, classes: list[str], labels: list[str]) -> float:
    return float(np.mean([classes[i] == y for i, y in zip(probs.argmax(1), labels)]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished run folder (model.json + model.safetensors)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the folder with valid/<class>/ the run was trained on")
    p.add_argument("--sizes", type=int, nargs="+", default=[192, 224], help="test-time sizes, px")
    args = p.parse_args(argv)

    from fastlesson.export import PREDICT_BS, load_model
    from fastlesson.space_app import flip_tta

    data = resolve_data(args.data)
    items = valid_items(data)
    pred = load_model(args.run, backend="torch")
    trained = int(pred.meta["resize"]["size"][0])
    recorded = json.loads((args.run / "metrics.json").read_text()) if (args.run / "metrics.json").exists() else {}
    print(env_summary())
    print(f"run {args.run} ({pred.meta.get('arch')}, trained at {trained} px), {len(items)} validation images")
    if recorded:
        final = recorded.get("final", {})
        print(f"the recipe's own figures: accuracy {final.get('accuracy')}, with TTA {final.get('accuracy_tta')}")
    labels = [c for _, c in items]
    unknown = sorted(set(labels) - set(pred.classes))
    if unknown:
        raise SystemExit(f"{len(unknown)} validation labels are not classes of the model (e.g. {unknown[0]!r}): "
                         f"pass the --data folder the run was trained on")
    paths = [f for f, _ in items]
    rows = []
    for size in [trained] + [s for s in args.sizes if s != trained]:
        at_size(pred, size)
        plain, tta, dt = [], [], 0.0
        for i in range(0, len(paths), PREDICT_BS):  # each image decoded once for both figures
            t0 = time.perf_counter()
            x = pred.inputs(paths[i:i + PREDICT_BS])
            plain.append(pred.batch_probs(x))
            dt += time.perf_counter() - t0  # decode + one forward pass: what a plain prediction costs
            tta.append(flip_tta(pred.batch_probs, x))
        acc = accuracy(np.concatenate(plain), pred.classes, labels)
        acc_tta = accuracy(np.concatenate(tta), pred.classes, labels)
        rows.append((size, acc, acc_tta, 1000 * dt / len(paths)))
        print(f"  {size:4d} px: accuracy {acc:.2%}  with flip TTA {acc_tta:.2%}  ({rows[-1][3]:.1f} ms/image)",
              flush=True)
    base = rows[0]
    print("\nsize | accuracy | flip TTA | vs trained size | ms/image")
    for size, acc, acc_tta, ms in rows:
        print(f"{size} | {acc:.2%} | {acc_tta:.2%} | {100 * (acc - base[1]):+.1f} / {100 * (acc_tta - base[2]):+.1f}"
              f" points | {ms:.1f}")


if __name__ == "__main__":
    main()
