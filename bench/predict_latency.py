"""Prediction latency: fastai's learn.predict vs fastlesson on PyTorch vs fastlesson on onnxruntime.

    python bench/predict_latency.py --run runs/flowers          # a recipe run (lite0, 160 px): ~3 min
    python bench/predict_latency.py                             # trains a --smoke run first: ~2 min

One run, the same model and the same image files for all three, `--threads` CPU threads each
(torch.set_num_threads; onnxruntime intra_op_num_threads). Batch 1: the median of `--calls` calls
after `--warmup` calls, one image file per call (decode included, as a user would call it).
Batch 32: images per second over `--repeats` batches of 32 files. Then top-1 agreement of onnx vs
torch over the whole validation folder. Target (issue 13): fastlesson batch-1 <= 1/6 of fastai's
learn.predict, top-1 identical to PyTorch.

fastai's learner comes from the run's export.pkl (the run is yours: this bench unpickles it), else
it is rebuilt from the safe bundle with a DataBlock. A run without model.onnx is exported to a
temporary copy first (fastlesson.export_onnx(None, copy)); the run folder is never changed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import REPO, _version, env_summary  # noqa: E402

BS = 32  # images per batch in the throughput figure


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run folder (model.json + model.safetensors); default: "
                    "train `scripts/recipe.py --smoke` into a temporary folder")
    ap.add_argument("--images", default=None, help="validation folder of class folders (default: the "
                    "run's data/valid from model.json, else the shipped sample's valid/)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per backend (default: %(default)s)")
    ap.add_argument("--calls", type=int, default=30, help="timed batch-1 calls (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls first (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="timed batches of 32 (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="validation images for the agreement check "
                    "(default: all)")
    return ap.parse_args(argv)


def smoke_run(dest: Path) -> Path:
    """A seconds-long recipe run (shipped sample data) when no --run is given."""
    cmd = [sys.executable, str(REPO / "scripts" / "recipe.py"), "--smoke", "--out", str(dest)]
    print("no --run: training", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return dest


def onnx_ready(run: Path, tmp: Path) -> Path:
    """`run` if it has model.onnx, else a temporary copy of its bundle with model.onnx added."""
    from fastlesson.export import BUNDLE_META, BUNDLE_WEIGHTS, ONNX_FILE, export_onnx

    if (run / ONNX_FILE).is_file():
        return run
    copy = tmp / "with_onnx"
    copy.mkdir()
    for name in (BUNDLE_META, BUNDLE_WEIGHTS):
        shutil.copy(run / name, copy / name)
    info = export_onnx(None, copy)
    if not info["ok"]:
        raise SystemExit(f"error: the run's model cannot be exported to ONNX: {info['error']}")
    print(f"exported model.onnx to a temporary copy ({info['seconds']} s, {info['exporter']} exporter)")
    return copy


def image_folder(args, meta: dict) -> Path:
    from fastlesson.data import sample_path

    for cand in (args.images, Path(str(meta["data"])) / "valid" if meta.get("data") else None,
                 Path(sample_path()) / "valid"):
        if cand is not None and Path(cand).is_dir():
            return Path(cand)
    raise SystemExit("error: no validation images found; pass --images FOLDER")


def fastai_learner(run: Path, meta: dict, files: list[Path]):
    """fastai's Learner for `learn.predict`: export.pkl when the run has one, else from the bundle."""
    pkl = run / "export.pkl"
    if pkl.is_file():
        from fastai.learner import load_learner

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_learner(pkl, cpu=True), "load_learner(export.pkl)"
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import Normalize, parent_label
    from fastai.learner import Learner
    from fastai.vision.augment import RandomResizedCrop, Resize
    from fastai.vision.data import ImageBlock

    from fastlesson.export import load_model

    r = meta["resize"]
    w, h = r["size"]
    tfm = (RandomResizedCrop((h, w), val_xtra=r["val_xtra"]) if r["type"] == "RandomResizedCrop"
           else Resize((h, w), method=r["method"], pad_mode=r.get("pad_mode", "reflection")))
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=meta["classes"])), get_items=lambda _: files,
                      get_y=parent_label, item_tfms=tfm, batch_tfms=Normalize.from_stats(meta["mean"], meta["std"]))
    dls = block.dataloaders(run, bs=BS, num_workers=0, device="cpu")
    model = load_model(run, backend="torch", device="cpu").model
    return Learner(dls, model), "Learner(safe bundle)"


def median_ms(fn, items: list, calls: int, warmup: int) -> float:
    for i in range(warmup):
        fn(items[i % len(items)])
    times = []
    for i in range(calls):
        t = time.perf_counter()
        fn(items[i % len(items)])
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def images_per_s(fn, files: list, repeats: int) -> float:
    batches = [files[(i * BS) % len(files):][:BS] for i in range(repeats + 1)]
    batches = [b if len(b) == BS else (b + files)[:BS] for b in batches]
    fn(batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches[1:]:
        fn(b)
    return repeats * BS / (time.perf_counter() - t)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from fastlesson.export import image_files, load_model, read_meta

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else smoke_run(tmp / "smoke")
        meta = read_meta(run / "model.json")
        files = image_files([image_folder(args, meta)])
        timed = files[: max(BS, args.calls)]
        onnx_run = onnx_ready(run, tmp)
        learn, how = fastai_learner(run, meta, files)
        pt = load_model(run, backend="torch", device="cpu")
        ort = load_model(onnx_run, backend="onnx", threads=args.threads)

        rows = []
        with learn.no_bar(), learn.no_logging():
            b1 = median_ms(lambda f: learn.predict(f), timed, args.calls, args.warmup)
            tp = images_per_s(lambda fs: learn.get_preds(dl=learn.dls.test_dl(fs, bs=BS, num_workers=0)),
                              timed, args.repeats)
        rows.append((f"fastai learn.predict ({how})", b1, tp))
        for name, m in (("fastlesson torch", pt), ("fastlesson onnx", ort)):
            b1 = median_ms(lambda f, m=m: m.predict(f), timed, args.calls, args.warmup)
            tp = images_per_s(lambda fs, m=m: m.probs(fs, bs=BS), timed, args.repeats)
            rows.append((name, b1, tp))

        check = files[: args.limit] if args.limit else files
        p_pt, p_ort = pt.probs(check, bs=BS), ort.probs(check, bs=BS)

    print(f"\nrun: {run}  ({meta['arch']}, {meta['resize']['size'][0]} px, {len(meta['classes'])} classes)")
    print(f"images: {len(timed)} files from {image_folder(args, meta)}; threads per backend: {args.threads}")
    print(f"batch 1: median of {args.calls} calls after {args.warmup} warm-up; batch {BS}: {args.repeats} batches\n")
    base1, baset = rows[0][1], rows[0][2]
    print(f"| {'predictor':<44} | batch-1 ms | vs fastai | batch-{BS} img/s | vs fastai |")
    print(f"|{'-' * 46}|-----------:|----------:|---------------:|----------:|")
    for name, b1, tp in rows:
        print(f"| {name:<44} | {b1:10.1f} | {b1 / base1:8.2f}x | {tp:14.1f} | {tp / baset:8.2f}x |")
    best = min(r[1] for r in rows[1:])
    print(f"\ntarget: batch-1 <= 1/6 of fastai ({base1 / 6:.1f} ms): best fastlesson {best:.1f} ms "
          f"= 1/{base1 / best:.1f} of fastai -> {'met' if best <= base1 / 6 else 'NOT met'}")
    agree = float((p_pt.argmax(1) == p_ort.argmax(1)).float().mean())
    print(f"top-1 agreement onnx vs torch on {len(check)} validation images: {100 * agree:.2f}% "
          f"(max abs diff of probabilities {float((p_pt - p_ort).abs().max()):.2e})\n")
    print(env_summary())
    print("versions (prediction): " + ", ".join(f"{p} {_version(p)}" for p in ("onnxruntime", "onnx", "pillow",
                                                                              "numpy", "gradio")))


if __name__ == "__main__":
    main()
