"""The run report: plots from plain arrays (headless matplotlib), history.csv and report.md.

Every plot takes numbers, not a Learner, so it can be tested and reused on its own; the confusion
matrix, most-confused pairs and top losses come from fastai's ClassificationInterpretation (``Interpretation``).
Figures are built with ``matplotlib.figure.Figure`` (no pyplot): no display needed, no global state.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fastai.interpret import ClassificationInterpretation
from matplotlib.figure import Figure

from fastlesson._io import atomic_write_text, save_png

MANY_CLASSES = 20  # above this a confusion matrix is unreadable: list the most-confused pairs instead
HISTORY_FIELDS = ("step", "epoch", "step_epoch", "train_loss", "valid_loss", "accuracy", "lr", "seconds")


def save_figure(fig: Figure, path) -> Path:
    """Save `fig` as PNG atomically (temp file + os.replace)."""
    return save_png(fig, path, bbox_inches="tight")


def _step_spans(steps: Sequence[str]) -> list[tuple[str, int, int]]:
    """[(name, start, end)] runs of equal consecutive step names."""
    spans: list[tuple[str, int, int]] = []
    for i, s in enumerate(steps):
        if spans and spans[-1][0] == s:
            spans[-1] = (s, spans[-1][1], i + 1)
        else:
            spans.append((s, i, i + 1))
    return spans


def _shade_steps(ax, spans, offset: float = 0.0) -> None:
    """Alternate light bands with the step name on top, so a reader sees which step did what."""
    for k, (name, a, b) in enumerate(spans):
        if k % 2:
            ax.axvspan(a + offset, b + offset, color="0.93", zorder=0)
        ax.text((a + b) / 2 + offset, 1.01, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=7, rotation=0)


def plot_lr_schedule(segments: Sequence[tuple[str, np.ndarray]], path=None) -> Figure:
    """LR per batch across all steps; `segments` = [(step, lrs (n_batches,) or (n_batches, n_groups))]."""
    fig = Figure(figsize=(9, 3.5))
    ax = fig.add_subplot()
    start, spans, labelled = 0, [], set()
    for name, lrs in segments:
        lrs = np.asarray(lrs, dtype=float)
        if lrs.size == 0:
            continue
        lrs = lrs.reshape(len(lrs), -1)
        x = np.arange(start, start + len(lrs))
        for g in range(lrs.shape[1]):
            ax.plot(x, lrs[:, g], color=f"C{g}", lw=1.2, marker="." if len(lrs) < 40 else None,
                    label=None if g in labelled else f"group {g}")
            labelled.add(g)
        spans.append((name, start, start + len(lrs)))
        start += len(lrs)
    _shade_steps(ax, spans, offset=-0.5)  # batch i sits at x=i: its band is [i - 0.5, i + 0.5]
    ax.set_yscale("log")
    ax.set_xlabel("batch (all training steps, in order)")
    ax.set_ylabel("learning rate")
    if labelled:
        ax.legend(fontsize=7, loc="lower left")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_losses(history: Sequence[dict], path=None) -> Figure:
    """Train and valid loss (and accuracy) per epoch, one x position per epoch of every step."""
    fig = Figure(figsize=(9, 3.5))
    ax = fig.add_subplot()
    x = np.arange(1, len(history) + 1)
    col = {k: np.array([np.nan if r.get(k) in (None, "") else float(r[k]) for r in history])
           for k in ("train_loss", "valid_loss", "accuracy")}
    seen = {k: np.isfinite(v) for k, v in col.items()}  # epochs not validated (mid-cycle) are skipped
    ax.plot(x, col["train_loss"], "o-", label="train loss")
    ax.plot(x[seen["valid_loss"]], col["valid_loss"][seen["valid_loss"]], "s-", label="valid loss")
    _shade_steps(ax, _step_spans([r["step"] for r in history]), offset=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if seen["accuracy"].any():
        ax2 = ax.twinx()
        ax2.plot(x[seen["accuracy"]], col["accuracy"][seen["accuracy"]], "^--", color="C2", label="accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    if path is not None:
        save_figure(fig, path)
    return fig


class Interpretation(ClassificationInterpretation):
    """fastai's ``ClassificationInterpretation`` (confusion matrix, most-confused pairs, top losses) over
    the validation losses the run already has. What fastai lacks, and all that is added here: its
    ``confusion_matrix`` runs ``get_preds`` again on every call (``most_confused`` calls it too), so the
    matrix is computed once and kept; the pairs come back as plain ``(str, str, int)`` for JSON."""

    _cm = None

    def confusion_matrix(self) -> np.ndarray:
        if self._cm is None:
            self._cm = super().confusion_matrix()
        return self._cm.copy()  # fastai's most_confused fills the diagonal of the matrix it gets

    def most_confused(self, min_val: int = 1) -> list[tuple[str, str, int]]:
        return [(str(a), str(p), int(n)) for a, p, n in super().most_confused(min_val)]


def plot_confusion(interp: Interpretation, path=None) -> Figure:
    """Confusion matrix with counts (few classes) or a bar chart of the most-confused pairs (many).
    fastai's ``plot_confusion_matrix`` draws on pyplot's global figure; this one is a plain Figure."""
    classes = [str(c) for c in interp.vocab]
    if len(classes) > MANY_CLASSES:
        return plot_most_confused(interp.most_confused()[:20], path)
    cm, n = interp.confusion_matrix(), len(classes)
    fig = Figure(figsize=(max(4, 0.45 * n + 2), max(3.5, 0.45 * n + 1.5)))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [str(c) for c in classes], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    hi = cm.max() if cm.size else 0
    for (a, p), v in np.ndenumerate(cm):
        if v:
            ax.text(p, a, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > hi / 2 else "black")
    ax.set_title("confusion matrix (validation set)")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_most_confused(pairs: Sequence[tuple[str, str, int]], path=None) -> Figure:
    """Horizontal bars: 'actual -> predicted' and how often."""
    fig = Figure(figsize=(7, max(2.5, 0.3 * len(pairs) + 1)))
    ax = fig.add_subplot()
    if pairs:
        labels = [f"{a} -> {p}" for a, p, _ in pairs][::-1]
        ax.barh(range(len(pairs)), [c for *_, c in pairs][::-1])
        ax.set_yticks(range(len(pairs)), labels, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no confusions on the validation set", ha="center", va="center")
    ax.set_xlabel("validation images")
    ax.set_title("most-confused pairs (actual -> predicted)")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_top_losses(images: Sequence[np.ndarray], actual: Sequence[str], predicted: Sequence[str],
                    probs: Sequence[float], losses: Sequence[float], path=None) -> Figure:
    """Grid of the validation images with the highest loss: predicted/actual, loss, prob."""
    n = len(images)
    cols = min(4, max(1, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3 * cols, 3.2 * rows))
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < n:
            ax.imshow(np.asarray(images[i]))
            ax.set_title(f"pred {predicted[i]} / actual {actual[i]}\nloss {losses[i]:.2f}, "
                         f"prob {probs[i]:.2f}", fontsize=7)
    fig.suptitle("top losses (prediction / actual / loss / probability of prediction)", fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig


def write_history_csv(history: Sequence[dict], path) -> Path:
    """history.csv: one row per epoch of every step. Not fastai's CSVLogger (``--log csv`` attaches that
    one): it has one file per fit and no step name, step epoch or LR column, which this file is for."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in history:
        w.writerow({k: _fmt_csv(r.get(k)) for k in HISTORY_FIELDS})
    text = buf.getvalue()
    return atomic_write_text(path, text)


def _fmt_csv(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple, np.ndarray)):
        return " ".join(f"{float(x):.3g}" for x in np.ravel(v))
    return "" if v is None else v


def _fmt(v, pct: bool = False) -> str:
    """Human number for the report table."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (list, tuple, np.ndarray)):
        return " / ".join(f"{float(x):.2g}" for x in np.ravel(v))
    if pct:
        return f"{100 * float(v):.1f}%"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _budget_lines(b: dict | None) -> list[str]:
    """The time budget's plan next to what the run did."""
    if not b:
        return []
    plan, act = b.get("planned", {}), b.get("actual", {})
    return ["## Time budget", "",
            "| | minutes | step 3 epochs | step 4 cycles | step 8 cycles |", "|---|---|---|---|---|",
            f"| budget | {_fmt(b.get('budget_min'))} | | | |",
            f"| planned | {_fmt(plan.get('minutes'))} | {_fmt(plan.get('precompute_epochs'))} | "
            f"{_fmt(plan.get('head_cycles'))} | {_fmt(plan.get('full_cycles'))} |",
            f"| actual | {_fmt(act.get('minutes'))} | {_fmt(plan.get('precompute_epochs'))} | "
            f"{_fmt(plan.get('head_cycles'))} | {_fmt(act.get('full_cycles'))} "
            f"({_fmt(act.get('full_epochs'))} epochs) |", ""]


def write_report(out_dir, config: dict, metrics: dict, plots: dict[str, str]) -> Path:
    """report.md: headline numbers, a per-step table and every plot, all with relative links."""
    out_dir = Path(out_dir)
    final = metrics.get("final", {})
    eps = config.get("label_smoothing") or 0
    loss = f" (label-smoothed cross-entropy, eps {eps:g})" if eps else ""
    lines = [f"# fastlesson recipe run: {config.get('data')} / {config.get('arch')}", ""]
    lines += [
        f"**Validation accuracy {_fmt(final.get('accuracy'), True)}** "
        f"(with TTA {_fmt(final.get('accuracy_tta'), True)}), valid loss {_fmt(final.get('valid_loss'))}{loss}, "
        f"{final.get('n_valid', '-')} validation images, {final.get('n_classes', '-')} classes; "
        f"{_fmt(metrics.get('seconds_total'))} s in total on {metrics.get('device', '-')}.", ""]
    if metrics.get("skipped"):
        lines += [f"{len(metrics['skipped'])} unreadable image(s) were skipped, listed in metrics.json.", ""]
    for r in metrics.get("resumed") or []:
        lines += [f"This run was interrupted and **resumed** at {r.get('at')} from its checkpoint after "
                  f"{r.get('after')} (written {r.get('checkpoint_written', '-')}).", ""]
    lines += _budget_lines(metrics.get("budget"))
    lines += ["## Steps", "",
              "| # | step | LR (per group) | epochs | seconds | train loss | valid loss | accuracy | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in metrics.get("steps", []):
        lines.append(f"| {s['index']} | {s.get('title', s['name'])} | {_fmt(s.get('lr'))} | "
                     f"{_fmt(s.get('epochs') or None)} | "
                     f"{_fmt(s.get('seconds'))} | {_fmt(s.get('train_loss'))} | {_fmt(s.get('valid_loss'))} | "
                     f"{_fmt(s.get('accuracy'), True)} | {s.get('note', '')} |")
    lines.append("")
    titles = {"lr_find_head": "LR range test, frozen body (step 2)",
              "lr_find_full": "LR range test, unfrozen (step 7)",
              "lr_schedule": "Learning rate actually used, every batch of every step",
              "losses": "Train and validation loss per epoch",
              "confusion": "Confusion on the validation set", "top_losses": "Top losses"}
    lines += ["## Plots", ""]
    for key, fname in plots.items():
        lines += [f"### {titles.get(key, key)}", "", f"![{key}]({fname})", ""]
    lines += ["## Files", "",
              "- `config.json`: the effective configuration; `metrics.json`: the numbers above; "
              "`history.csv`: every epoch.",
              "- `model.safetensors` + `model.json`: the safe bundle "
              "(`fastlesson.load_model(dir)` or `python scripts/predict.py DIR IMAGE...`).",
              "- `export.pkl`: fastai's `load_learner` format (unpickles: load only if you trust it).",
              _onnx_line(metrics.get("onnx")),
              "- web demo: `python scripts/app.py DIR` (examples in `examples/`); "
              "`--space DEST` writes a Hugging Face Spaces folder.", ""]
    cfg = "\n".join(f"    {k} = {v!r}" for k, v in config.items())
    lines += ["## Configuration", "", cfg, ""]
    text = "\n".join(lines)
    return atomic_write_text(out_dir / "report.md", text)


def _onnx_line(onnx: dict | None) -> str:
    """The report's line for model.onnx: the export check's numbers, or why there is none."""
    if not onnx:
        return "- `model.onnx`: not exported."
    if not onnx.get("ok"):
        return f"- `model.onnx`: not written, the export failed ({onnx.get('error')}); the safe bundle above works."
    return (f"- `model.onnx`: the same model for onnxruntime (`--backend onnx`); checked against PyTorch on "
            f"{onnx.get('n_checked')} validation images: max |difference| of probabilities "
            f"{onnx.get('max_abs_diff', float('nan')):.1e}, top-1 agreement {100 * onnx.get('top1_agreement', 0.0):.0f}%.")
