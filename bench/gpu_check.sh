#!/usr/bin/env bash
# The GPU path (issue 14), one prepared script: on a machine with one CUDA GPU and no internet, < 8 minutes.
#
#     bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check (or $OUT when set)
#
#  1. the suite's GPU-marked tests: pytest -m gpu                                   (limit 150 s)
#  2. the recipe --smoke on CUDA (shipped sample data: mixed precision, channels-last) (limit 150 s)
#  3. step-8 training throughput (images/s) at 224 px: the recipe's step 8 (layer groups 1-2 unfrozen,
#     body BatchNorm frozen, channels-last, SGDR) in fp32, fp16 and bf16, against plain fastai
#     `fine_tune` with its defaults (fp32, every layer unfrozen after one frozen epoch), side by side
#                                                                                    (limit 240 s)
# Throughput runs on synthetic in-memory 224 px images (no decoding, no data files needed), lite0 with
# its offline ImageNet weights; 5 warm-up batches are not timed. Everything is written to OUT_DIR
# (pytest.txt, smoke.txt + smoke/, throughput.txt, throughput.json) and the summary printed at the end.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1  # no internet: never try
T0=$(date +%s)
status=0

echo "== hardware"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible to torch: nothing to check here" >&2
    exit 2
fi
python bench/_common.py

echo; echo "== 1. pytest -m gpu"
timeout 150 python -m pytest tests -m gpu -q -o addopts="" -p no:randomly -p no:cacheprovider \
    2>&1 | tee "$OUT_DIR/pytest.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU tests FAILED"; status=1; }

echo; echo "== 2. recipe --smoke on CUDA"
timeout 150 python scripts/recipe.py --smoke --out "$OUT_DIR/smoke" > "$OUT_DIR/smoke.txt" 2>&1
smoke=$?
tail -4 "$OUT_DIR/smoke.txt"
if [ "$smoke" -ne 0 ]; then echo "recipe --smoke FAILED (exit $smoke; see $OUT_DIR/smoke.txt)"; status=1; fi
python - "$OUT_DIR/smoke/metrics.json" <<'PY' || status=1
import json, sys
m = json.load(open(sys.argv[1]))
print(f"smoke: device {m['device']}, accuracy {100 * m['final']['accuracy']:.1f}%")
assert m["device"].startswith("GPU"), "the smoke run did not run on the GPU"
PY

echo; echo "== 3. step-8 throughput at 224 px, fp32 / fp16 / bf16 vs fastai fine_tune"
timeout 240 python - "$OUT_DIR" <<'PY' 2>&1 | tee "$OUT_DIR/throughput.txt"
import json, sys, time, warnings
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.training import BnFreeze, bn_types
from fastai.data.core import DataLoaders
from fastai.metrics import accuracy
from fastai.vision.all import Learner, default_split
import fastai.callback.channelslast  # noqa: F401
import fastai.callback.fp16  # noqa: F401
from torch.utils.data import TensorDataset

from fastlesson.models import build_model, create_learner
from fastlesson.schedule import fit_sgdr, freeze_to, lr_groups

warnings.filterwarnings("ignore")
ARCH, SIZE, BS, N_BATCHES, WARMUP, N_CLASSES = "tf_efficientnet_lite0", 224, 64, 40, 5, 10
out = Path(sys.argv[1])


class Throughput(Callback):
    """Training images/s of each fit, after WARMUP batches (cuDNN autotuning, allocator), GPU-synchronised."""
    order = 0

    def __init__(self):
        self.fits = []

    def before_fit(self):
        self.fits.append({"items": 0, "seconds": 0.0})

    def before_batch(self):
        if self.training and self.iter == WARMUP:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def after_batch(self):
        if self.training and self.iter >= WARMUP:
            self.fits[-1]["items"] += len(self.yb[0])

    def after_train(self):
        torch.cuda.synchronize()
        if hasattr(self, "t0"):
            self.fits[-1]["seconds"] = time.perf_counter() - self.t0
            del self.t0

    def ips(self, i=-1):
        f = self.fits[i]
        return f["items"] / f["seconds"] if f["seconds"] else float("nan")


def dls():
    g = torch.Generator().manual_seed(0)
    n = BS * N_BATCHES
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    valid = TensorDataset(x[:BS], y[:BS])
    return DataLoaders.from_dsets(TensorDataset(x, y), valid, bs=BS, shuffle=True, drop_last=True,
                                  device=torch.device("cuda"), num_workers=0)


def recipe_step8(precision):
    """The recipe's step 8 set-up: freeze_to(1), body BatchNorm frozen and held, channels-last, SGDR."""
    learn = create_learner(dls(), arch=ARCH, pretrained=True)
    learn.model.cuda()
    learn.to_channelslast(use_amp=False)
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()
    freeze_to(learn, 1, verbose=False)
    held = [p for m in learn.model[0].modules() if isinstance(m, bn_types) for p in m.parameters(recurse=False)]
    for p in held:
        p.requires_grad_(False)
    clock = Throughput()
    fit_sgdr(learn, n_cycles=1, cycle_len=1, lr_max=lr_groups(learn, 1e-3, factor=10), cbs=[clock, BnFreeze()])
    return clock.ips()


def fastai_fine_tune():
    """Plain fastai: same backbone and head, fastai's splitter, fine_tune(1) with its defaults (fp32)."""
    learn = Learner(dls(), build_model(ARCH, N_CLASSES, pretrained=True), splitter=default_split, metrics=accuracy)
    learn.model.cuda()
    clock = Throughput()
    learn.fine_tune(1, cbs=[clock])  # fit 1: frozen epoch; fit 2: every layer unfrozen
    return clock.ips(-1), clock.ips(0)


torch.manual_seed(0)
rows = {}
for precision in ("fp32", "fp16", "bf16"):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        rows["recipe step 8, bf16"] = float("nan")
        continue
    rows[f"recipe step 8, {precision}"] = recipe_step8(precision)
    torch.cuda.empty_cache()
unfrozen, frozen = fastai_fine_tune()
rows["fastai fine_tune, fp32 (unfrozen epoch)"] = unfrozen
rows["fastai fine_tune, fp32 (frozen epoch)"] = frozen
base = rows["fastai fine_tune, fp32 (unfrozen epoch)"]
print(f"{torch.cuda.get_device_name(0)}; {ARCH} {SIZE} px, batch {BS}, {N_BATCHES - WARMUP} timed batches "
      f"of synthetic images; torch {torch.__version__}")
print(f"{'training set-up':<42} {'images/s':>9} {'vs fine_tune':>12}")
for name, ips in rows.items():
    print(f"{name:<42} {ips:>9.1f} {ips / base:>11.2f}x")
(out / "throughput.json").write_text(json.dumps(rows, indent=1))
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "throughput FAILED"; status=1; }

echo; echo "== done in $(( $(date +%s) - T0 )) s, status $status (0: every check passed)"
exit $status
