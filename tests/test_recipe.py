"""The eight-step recipe on a tiny smoke run: step order, printed headers, every output, export."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fastlesson.callbacks as fl_callbacks
from fastlesson import report
from fastlesson.export import load_model
from fastlesson.recipe import SMOKE, RecipeConfig, fit_until_overfit, run_recipe

from _recipe_helpers import write_image_folder

STEP_NAMES = ["data", "lr_find_head", "precompute", "head_sgdr", "unfreeze", "discriminative",
              "lr_find_full", "full_sgdr"]
PNGS = ["lr_find_head.png", "lr_find_full.png", "lr_schedule.png", "losses.png", "confusion.png",
        "top_losses.png"]

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One smoke run (pretrained tf_efficientnet_lite0, 32 px) with hard-example mining switched on."""
    root = write_image_folder(tmp_path_factory.mktemp("data"))
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped, and said so in the report
    out = tmp_path_factory.mktemp("run")
    calls = []
    orig = fl_callbacks.HardExampleMining.after_loss

    def counting(self):
        calls.append(self.frac)
        return orig(self)

    buf = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 32 px images gain nothing from threads; on a busy CPU 2 threads crawl
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
            mp.setattr(fl_callbacks.HardExampleMining, "after_loss", counting)
            res = run_recipe(RecipeConfig(data=str(root), smoke=True, out=str(out), hard_mining=0.5))
    finally:
        torch.set_num_threads(threads)
    return res, out, root, buf.getvalue(), calls


def test_steps_run_in_order_with_headers(run):
    res, _, _, printed, _ = run
    assert [s["name"] for s in res.steps] == STEP_NAMES
    assert [s["index"] for s in res.steps] == list(range(1, 9))
    headers = re.findall(r"^Step (\d)/8: (.+)$", printed, flags=re.M)
    assert [int(i) for i, _ in headers] == list(range(1, 9))
    assert headers[2][1] == "train the head on precomputed activations"
    assert len(re.findall(r"  -> ", printed)) == 8  # one result line per step (after fastai's bars)


def test_learning_rates_follow_the_recipe(run):
    res, *_ = run
    s = {st["name"]: st for st in res.steps}
    lr_head = s["lr_find_head"]["lr"]
    assert s["precompute"]["lr"] == lr_head and s["head_sgdr"]["lr"] == lr_head
    ratios = np.array(s["discriminative"]["ratios"])
    assert len(ratios) >= 3 and np.allclose(ratios[:-1] / ratios[1:], 1 / res.config.lr_factor)
    full = np.array(s["lr_find_full"]["lr"])
    assert np.allclose(full / full[-1], ratios)  # step 8 trains with the discriminative LRs
    assert lr_head / 10 <= full[-1] <= lr_head  # never above the head's LR, nor below a tenth of it
    rise = res.metrics["lr_find"]["full"]
    if rise["stop_reason"] != "failed":  # step 7 picks a tenth of where the loss starts to rise
        assert rise["suggestion"] == pytest.approx(rise["rise_lr"] / 10)
        assert full[-1] == pytest.approx(np.clip(rise["rise_lr"] / 10, lr_head / 10, lr_head))
    assert np.allclose(s["full_sgdr"]["lr"], full)
    assert s["unfreeze"]["trainable_groups"] == len(ratios) - res.config.freeze_to == 2


def test_step8_keeps_the_early_body_and_the_body_batchnorm_as_pretrained(run):
    """Defaults freeze_to=1 and bn_freeze: after the whole run the early layer group and every BatchNorm
    layer of the body (weights and running statistics) are the ImageNet ones bit for bit; the late body
    trained; the layout is plain again (channels-last only while training)."""
    from fastlesson.models import build_model, splitter

    res, *_ = run
    model = res.learn.model
    names = {id(p): n for n, p in model.named_parameters()}
    early = {names[id(p)] for p in splitter(model)[0]}
    late = {names[id(p)] for p in splitter(model)[1]}
    fresh = build_model(res.config.arch, len(res.learn.dls.vocab), pretrained=True).state_dict()
    trained = model.state_dict()
    bn_keys = {k for k in trained if k.startswith("0.") and re.search(r"\.(bn\d*)\.", k)}
    assert bn_keys and any(k.endswith("running_var") for k in bn_keys)
    for k in early | bn_keys:
        assert torch.equal(trained[k], fresh[k]), k
    if next(st for st in res.steps if st["name"] == "full_sgdr")["best_epoch"] > 0:  # a trained epoch kept
        assert any(not torch.equal(trained[k], fresh[k]) for k in late - bn_keys)
    params = dict(model.named_parameters())
    # left as fastai's freeze_to(1) leaves a learner: BatchNorm trainable again (train_bn), early convs not
    assert all(params[k].requires_grad == (k not in early or k in bn_keys) for k in params)
    assert all(p.is_contiguous() for p in model.parameters())


def test_outputs_written(run):
    res, out, *_ = run
    for name in ["config.json", "metrics.json", "history.csv", "report.md", "model.json",
                 "model.safetensors", "export.pkl", *PNGS]:
        assert (out / name).is_file(), name
    for png in PNGS:
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["smoke"] and cfg["size"] == SMOKE["size"] and cfg["hard_mining"] == 0.5  # effective config
    m = json.loads((out / "metrics.json").read_text())
    assert [s["name"] for s in m["steps"]] == STEP_NAMES
    for st in m["steps"]:
        assert st["seconds"] >= 0 and "epochs" in st
    for name in ("precompute", "head_sgdr", "full_sgdr"):
        st = next(s for s in m["steps"] if s["name"] == name)
        assert st["epochs"] >= 1 and st["valid_loss"] is not None and 0 <= st["accuracy"] <= 1
    assert 0 <= m["final"]["accuracy"] <= 1 and 0 <= m["final"]["accuracy_tta"] <= 1
    assert m["final"]["accuracy"] == pytest.approx(res.accuracy)
    assert m["lr_find"]["head"]["suggestion"] > 0 and m["lr_find"]["full"]["suggestion"] > 0


def test_history_has_every_training_epoch(run):
    res, out, *_ = run
    rows = list(csv.DictReader(open(out / "history.csv")))
    steps = [r["step"] for r in rows]
    assert steps[0] == "precompute" and steps[-1] == "full_sgdr" and "head_sgdr" in steps
    assert not any(s.startswith("lr_find") for s in steps)  # LR sweeps are not training epochs
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    total = sum(s["epochs"] for s in res.steps)
    assert len(rows) == total
    assert all(float(r["valid_loss"]) > 0 for r in rows)


def test_report_shows_plots_and_numbers(run):
    res, out, *_ = run
    md = (out / "report.md").read_text()
    for png in PNGS:
        assert f"]({png})" in md
    assert f"{100 * res.accuracy:.1f}%" in md
    for st in res.steps:
        assert st["title"] in md


def test_best_weights_restored_and_exported(run):
    """Final metrics are those of the best epoch kept by step 8, and the bundle holds those weights."""
    res, out, root, _, _ = run
    best = next(s for s in res.steps if s["name"] == "full_sgdr")["best_valid_loss"]
    assert res.valid_loss == pytest.approx(best, rel=1e-4, abs=1e-5)
    files = sorted((root / "valid").rglob("*.jpg"))
    probs = load_model(out, device="cpu").probs(files)
    dl = res.learn.dls.test_dl(files)
    ref, _ = res.learn.get_preds(dl=dl)
    assert torch.allclose(probs, ref, atol=1e-5)


def test_hard_mining_wired_in(run):
    *_, calls = run
    assert calls and set(calls) == {0.5}  # HardExampleMining(frac=0.5) ran on training batches


def _script_valid_losses(monkeypatch, losses):
    """Make BestWeights see these validation losses, one per epoch (the training itself is real)."""
    it = iter(losses)
    real = fl_callbacks.BestWeights.after_epoch

    def scripted(self):
        self.recorder.values[-1][1] = next(it)
        real(self)

    monkeypatch.setattr(fl_callbacks.BestWeights, "after_epoch", scripted)


@pytest.mark.parametrize("epochs_max,cycles", [(2, 1), (3, 2), (6, 2), (7, 3)])
def test_fit_until_overfit_never_starts_a_cycle_past_epochs_max(tiny_learner, monkeypatch, epochs_max, cycles):
    """Validation loss always improves, so only epochs_max stops it: cycles of 1, 2, 4 epochs run while
    they end within it, and the one that would pass it never trains a single batch."""
    from fastai.callback.core import Callback

    _script_valid_losses(monkeypatch, [1.0 / (i + 2) for i in range(20)])

    class Count(Callback):
        def __init__(self):
            self.epochs = self.batches = 0

        def after_epoch(self):
            self.epochs += 1

        def after_batch(self):
            self.batches += self.training

    learn, count = tiny_learner(), Count()
    stop = fit_until_overfit(learn, 1e-3, epochs_max=epochs_max, baseline=10.0, cbs=[count])
    assert (stop["cycles"], stop["epochs"]) == (cycles, 2 ** cycles - 1)
    assert count.epochs == 2 ** cycles - 1 and count.batches == count.epochs * len(learn.dls.train)
    assert f"would pass epochs_max={epochs_max}" in stop["reason"]


def test_fit_until_overfit_stops_when_a_cycle_does_not_improve(tiny_learner, monkeypatch):
    """Cycles 1 (1 epoch) and 2 (2 epochs) improve, cycle 3 (4 epochs) does not: stop, keep epoch 3."""
    _script_valid_losses(monkeypatch, [0.9, 0.8, 0.7, 0.75, 0.72, 0.71, 0.74])
    stop = fit_until_overfit(tiny_learner(), 1e-3, epochs_max=15, baseline=1.0)
    assert (stop["cycles"], stop["epochs"], stop["best_epoch"]) == (3, 7, 3)
    assert stop["best_valid_loss"] == pytest.approx(0.7) and "cycle 3" in stop["reason"]


def test_fit_until_overfit_restores_start_when_never_better(tiny_learner, monkeypatch):
    """No epoch beats the starting weights' validation loss: those weights come back, exactly."""
    _script_valid_losses(monkeypatch, [0.9, 0.95, 0.97])
    learn = tiny_learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    stop = fit_until_overfit(learn, 1e-2, epochs_max=15, baseline=0.5)
    assert (stop["cycles"], stop["epochs"], stop["best_epoch"]) == (2, 3, 0)
    assert stop["best_valid_loss"] == 0.5
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fit_until_overfit_bounded_by_epochs_max(tiny_learner):
    """While it improves, cycles of 1, 2, 4 epochs run; the 8-epoch cycle would pass epochs_max=7."""
    learn = tiny_learner(n_train=128)
    stop = fit_until_overfit(learn, 3e-3, epochs_max=7)
    if stop["cycles"] == 3:
        assert stop["epochs"] == 7 and "epochs_max=7" in stop["reason"]
    else:  # the tiny task may already stop improving; the rule must still hold
        assert "did not improve" in stop["reason"] and stop["epochs"] == 2 ** stop["cycles"] - 1
    assert learn.validate()[0] == pytest.approx(stop["best_valid_loss"], rel=1e-5)


def test_fit_until_overfit_validates_at_cycle_ends_only(tiny_learner):
    """valid_every_epoch=False: cycles of 1 and 2 epochs validate after epochs 1 and 3 only; epoch 2's row
    has its training loss alone, and only validated epochs are best-weight candidates."""
    learn = tiny_learner(n_train=128)
    stop = fit_until_overfit(learn, 3e-3, epochs_max=3, baseline=math.inf, valid_every_epoch=False)
    assert (stop["cycles"], stop["epochs"]) == (2, 3)
    rows = [list(v) for v in learn.recorder.values]  # the last fit (cycle 2): epochs 2 and 3
    assert len(rows[0]) == 1 and len(rows[1]) == 3  # [train_loss] | [train_loss, valid_loss, accuracy]
    assert stop["best_epoch"] in (1, 3)
    assert learn.validate()[0] == pytest.approx(stop["best_valid_loss"], rel=1e-5)


@pytest.mark.parametrize("field,value", [("size", 4), ("bs", 0), ("epochs_max", 0), ("opt", "adamw"),
                                         ("freeze_to", -1), ("freeze_to", 1.0),
                                         ("lr_factor", 0.5), ("hard_mining", 1.5), ("lr_find_iters", 5)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"RecipeConfig.{field}="):
        RecipeConfig(**{field: value}).effective()


def test_config_defaults_and_smoke():
    d = RecipeConfig()
    assert (d.data, d.arch, d.precompute, d.pretrained, d.hard_mining) == (
        "sample", "tf_efficientnet_lite0", True, True, None)
    eff = d.effective()
    assert re.fullmatch(r"runs/sample-tf_efficientnet_lite0-\d{8}-\d{6}", eff.out)
    smoke = RecipeConfig(smoke=True, data="/x/my data").effective()
    assert smoke.size == SMOKE["size"] and smoke.epochs_max == 1 and "my_data-" in smoke.out
    assert (d.freeze_to, d.bn_freeze, d.lr_factor) == (1, True, 10)
    scratch = RecipeConfig(pretrained=False).effective()  # random early layers and BN statistics must train
    assert (scratch.freeze_to, scratch.bn_freeze) == (0, False)


def test_freeze_to_past_the_body_is_refused_before_any_output(tmp_path):
    root = write_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"freeze_to=2 would leave only the head.*use 0\.\.1"):
        run_recipe(RecipeConfig(data=str(root), smoke=True, out=str(out), freeze_to=2))
    assert not out.exists()


# ---------------------------------------------------------------- report.py on plain arrays


def _interp(targets, preds, classes):
    """report.Interpretation over fixed predictions; the fake learner counts its get_preds calls."""
    import torch
    from fastai.data.transforms import CategoryMap

    calls = []

    def get_preds(**kw):
        calls.append(kw)
        probs = torch.nn.functional.one_hot(torch.tensor(preds), len(classes)).float()
        return probs, torch.tensor(targets), torch.tensor(preds)

    learn = SimpleNamespace(get_preds=get_preds)
    dl = SimpleNamespace(vocab=CategoryMap(list(classes)))
    return report.Interpretation(learn, dl, torch.zeros(len(targets))), calls


def test_interpretation_is_fastais_with_one_prediction_pass():
    interp, calls = _interp([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 2, 1, 1], "abc")
    assert interp.confusion_matrix().tolist() == [[1, 1, 0], [0, 1, 1], [0, 2, 1]]
    assert interp.most_confused() == [("c", "b", 2), ("a", "b", 1), ("b", "c", 1)]
    assert all(type(n) is int and type(a) is str for a, _, n in interp.most_confused())  # JSON-able
    assert interp.confusion_matrix().trace() == 3  # most_confused did not zero the kept matrix
    assert len(calls) == 1 and calls[0]["with_decoded"]  # fastai's own get_preds, run once
    assert _interp([0, 1, 2], [0, 1, 2], "abc")[0].most_confused() == []


def test_confusion_plot_switches_to_pairs_for_many_classes(tmp_path):
    few = report.plot_confusion(_interp([0, 1, 2], [0, 1, 2], "abc")[0], tmp_path / "few.png")
    assert "confusion matrix" in few.axes[0].get_title()
    n = report.MANY_CLASSES + 1
    targets = list(range(n)) + [0, 0, 0]
    many = report.plot_confusion(_interp(targets, list(range(n)) + [1, 1, 1], [f"c{i}" for i in range(n)])[0],
                                 tmp_path / "many.png")
    assert "most-confused" in many.axes[0].get_title()
    assert [t.get_text() for t in many.axes[0].get_yticklabels()] == ["c0 -> c1"]
    for f in ("few.png", "many.png"):
        assert Image.open(tmp_path / f).format == "PNG"


def test_lr_schedule_plot_concatenates_steps(tmp_path):
    segs = [("precompute", np.full((4, 3), np.nan)), ("head", np.linspace(1e-3, 1e-5, 6)[:, None] * [1, 1, 1]),
            ("full", np.linspace(1e-3, 1e-5, 8)[:, None] * [1 / 9, 1 / 3, 1])]
    segs[0][1][:, -1] = 1e-3  # head learner: only the last group has an LR
    fig = report.plot_lr_schedule(segs, tmp_path / "lr.png")
    ax = fig.axes[0]
    xs = np.concatenate([line.get_xdata() for line in ax.lines if line.get_color() == ax.lines[2].get_color()])
    assert sorted(xs) == list(range(18))  # 4 + 6 + 8 batches, one after another
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.texts] == ["precompute", "head", "full"]
    assert (tmp_path / "lr.png").is_file()


def test_history_csv_and_report(tmp_path):
    hist = [{"step": "head_sgdr", "epoch": 1, "step_epoch": 1, "train_loss": 1.5, "valid_loss": 1.25,
             "accuracy": 0.5, "lr": 1e-3, "seconds": 2.0},
            {"step": "full_sgdr", "epoch": 2, "step_epoch": 1, "train_loss": 1.1, "valid_loss": None,
             "accuracy": None, "lr": [1e-4, 1e-3], "seconds": 3.0},  # mid-cycle: not validated
            {"step": "full_sgdr", "epoch": 3, "step_epoch": 2, "train_loss": 0.9, "valid_loss": 0.75,
             "accuracy": 0.875, "lr": [1e-4, 1e-3], "seconds": 3.0}]
    report.write_history_csv(hist, tmp_path / "history.csv")
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["step"] for r in rows] == ["head_sgdr", "full_sgdr", "full_sgdr"] and rows[2]["accuracy"] == "0.875"
    assert rows[1]["valid_loss"] == rows[1]["accuracy"] == ""
    fig = report.plot_losses(hist, tmp_path / "losses.png")
    valid_line = next(ln for ln in fig.axes[0].lines if ln.get_label() == "valid loss")
    assert list(valid_line.get_xdata()) == [1, 3]  # the two validated epochs, joined across the gap
    metrics = {"steps": [{"index": 4, "name": "head_sgdr", "title": "train the head", "lr": 1e-3, "epochs": 1,
                          "seconds": 2.0, "valid_loss": 1.25, "accuracy": 0.5, "note": "n"}],
               "final": {"accuracy": 0.875, "accuracy_tta": 0.9, "valid_loss": 0.75, "n_valid": 8,
                         "n_classes": 2}, "seconds_total": 5.0, "device": "CPU"}
    md = report.write_report(tmp_path, {"data": "d", "arch": "a"}, metrics, {"losses": "losses.png"}).read_text()
    assert "87.5%" in md and "90.0%" in md and "| 4 | train the head | 0.001 |" in md
    assert "![losses](losses.png)" in md and "label-smoothed" not in md
    md = report.write_report(tmp_path, {"data": "d", "arch": "a", "label_smoothing": 0.1}, metrics, {}).read_text()
    assert "valid loss 0.75 (label-smoothed cross-entropy, eps 0.1)" in md  # the loss the numbers are in


def test_step4_trains_the_head_with_the_body_exactly_frozen(tiny_learner):
    """fastai's frozen fit trains the body's BatchNorm and moves its running stats; step 4 leaves the body
    as precompute saw it (weights and BN statistics bit for bit), trains the head, and afterwards the
    BN parameters are trainable again as fastai's train_bn has them."""
    from fastlesson.recipe import _fit_head_frozen_body
    from fastlesson.schedule import fit_sgdr, freeze

    def body_state(learn):
        return {k: v.clone() for k, v in learn.model[0].state_dict().items()}

    plain = tiny_learner()
    freeze(plain, verbose=False)
    before = body_state(plain)
    with plain.no_bar(), plain.no_logging():
        fit_sgdr(plain, 1, 1, lr_max=1e-2, cycle_mult=1)
    assert any(not torch.equal(v, before[k]) for k, v in body_state(plain).items())  # fastai's train_bn

    learn = tiny_learner()
    freeze(learn, verbose=False)
    grads = [p.requires_grad for p in learn.model.parameters()]
    before, head = body_state(learn), [p.clone() for p in learn.model[1].parameters()]
    with learn.no_bar(), learn.no_logging():
        _fit_head_frozen_body(learn, 1, 1e-2, [])
    assert all(torch.equal(v, before[k]) for k, v in body_state(learn).items())
    assert any(not torch.equal(a, b) for a, b in zip(head, learn.model[1].parameters()))
    assert [p.requires_grad for p in learn.model.parameters()] == grads


# ---------------------------------------------------------------- metrics against independent references


def test_accuracy_recomputed_from_the_learners_probabilities_and_the_true_labels(run):
    """metrics.json's accuracy = argmax of the final model's probabilities on the validation images
    (read from disk again), scored against the class folder each image sits in."""
    res, out, root, _, _ = run
    files = sorted((root / "valid").rglob("*.jpg"))
    classes = [str(c) for c in res.learn.dls.vocab]
    truth = np.array([classes.index(f.parent.name) for f in files])
    probs, _ = res.learn.get_preds(dl=res.learn.dls.test_dl(files))
    acc = float(np.mean(probs.argmax(1).numpy() == truth))
    m = json.loads((out / "metrics.json").read_text())
    assert m["final"]["accuracy"] == pytest.approx(acc, abs=1e-6) and m["final"]["n_valid"] == len(files)


def test_accuracy_recomputed_from_the_bundle_and_the_true_labels(run):
    """metrics.json's accuracy = the exported bundle's predictions on the validation images, scored
    against the class folder each image sits in (no fastai on this side)."""
    res, out, root, _, _ = run
    files = sorted((root / "valid").rglob("*.jpg"))
    predictor = load_model(out, device="cpu")
    classes = list(predictor.classes) if hasattr(predictor, "classes") else list(res.learn.dls.vocab)
    truth = [classes.index(f.parent.name) for f in files]
    probs = predictor.probs(files)
    acc = float(np.mean(probs.argmax(1).numpy() == np.array(truth)))
    m = json.loads((out / "metrics.json").read_text())
    assert m["final"]["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert m["final"]["n_valid"] == len(files)


def test_history_rows_are_the_epochs_the_config_asks_for(run):
    res, out, *_ = run
    cfg = res.config
    full = next(s for s in res.steps if s["name"] == "full_sgdr")
    expected = (["precompute"] * cfg.precompute_epochs + ["head_sgdr"] * cfg.head_cycles
                + ["full_sgdr"] * full["epochs"])
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["step"] for r in rows] == expected
    assert [int(r["step_epoch"]) for r in rows] == (list(range(1, cfg.precompute_epochs + 1))
                                                    + [1] * cfg.head_cycles + [1] * full["epochs"])


def test_report_says_how_many_images_were_skipped(run):
    res, out, *_ = run
    m = json.loads((out / "metrics.json").read_text())
    assert [Path(p).name for p, _ in m["skipped"]] == ["broken.jpg"]
    assert "1 unreadable image(s) were skipped, listed in metrics.json." in (out / "report.md").read_text()
    assert res.steps[0]["n_skipped"] == 1


def test_report_step8_row_shows_the_restored_model(run):
    res, out, *_ = run
    full = next(s for s in res.steps if s["name"] == "full_sgdr")
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 8 |"))
    assert report._fmt(full["best_valid_loss"]) in row
    assert full["valid_loss"] == pytest.approx(full["best_valid_loss"], rel=1e-6)


def _variant(tmp_path, **kw):
    root = write_image_folder(tmp_path / "data")
    with contextlib.redirect_stdout(io.StringIO()):
        return run_recipe(RecipeConfig(data=str(root), smoke=True, out=str(tmp_path / "run"), **kw))


def test_variant_no_precompute_no_tta(tmp_path):
    res = _variant(tmp_path, precompute=False, tta=False)
    s = {st["name"]: st for st in res.steps}
    assert "precompute off" in s["precompute"]["note"] and "seconds_cache" not in s["precompute"]
    assert s["precompute"]["epochs"] == 1 and res.accuracy_tta is None
    assert "(with TTA -)" in (res.out / "report.md").read_text()


def test_variant_no_pretrained_trains_every_layer_and_batchnorm(tmp_path):
    res = _variant(tmp_path, pretrained=False)
    assert (res.config.freeze_to, res.config.bn_freeze) == (0, False)
    s = {st["name"]: st for st in res.steps}
    assert s["unfreeze"]["trainable_groups"] == len(s["discriminative"]["ratios"])
    assert json.loads((res.out / "config.json").read_text())["pretrained"] is False


def test_variant_freeze_to_0_without_bn_freeze_trains_the_early_body_and_its_batchnorm(tmp_path):
    from fastlesson.models import build_model, splitter

    res = _variant(tmp_path, freeze_to=0, bn_freeze=False)
    model = res.learn.model
    assert all(p.requires_grad for p in splitter(model)[0])  # the early body was trainable in step 8
    full = next(st for st in res.steps if st["name"] == "full_sgdr")
    if full["best_epoch"] > 0:  # a trained epoch was kept: early body and BatchNorm statistics moved
        names = {id(p): n for n, p in model.named_parameters()}
        early = [names[id(p)] for p in splitter(model)[0]]
        fresh = build_model(res.config.arch, len(res.learn.dls.vocab), pretrained=True).state_dict()
        trained = model.state_dict()
        assert any(not torch.equal(trained[k], fresh[k]) for k in early)
        running = [k for k in trained if k.startswith("0.") and k.endswith("running_mean")]
        assert any(not torch.equal(trained[k], fresh[k]) for k in running)
    assert res.steps[4]["trainable_groups"] == len(res.steps[5]["ratios"]) and not res.steps[4]["bn_freeze"]


# ----------------------------------------------------------------------------- step 8: averaged cycle ends

TWO_CYCLES = dict(size=32, bs=8, epochs_max=3, precompute_epochs=1, head_cycles=1, lr_find_iters=32, top_losses=4,
                  tta=False)  # step 8: SGDR cycles of 1 and 2 epochs


def test_step8_averages_its_last_two_cycle_ends_and_keeps_the_better(tmp_path, monkeypatch):
    """average_cycles=2: the two cycle ends' weights are averaged, validated, and the model ends on the
    average when its validation loss beats the best cycle end's, else on the best cycle end."""
    import fastlesson.recipe as recipe

    seen = []

    def recording(states):
        seen.append(([{k: v.clone() for k, v in s.items()} for s in states], fl_callbacks.average_states(states)))
        return seen[-1][1]

    monkeypatch.setattr(recipe, "average_states", recording)
    data = write_image_folder(tmp_path / "data")
    with contextlib.redirect_stdout(io.StringIO()):
        res = run_recipe(RecipeConfig(data=str(data), out=str(tmp_path / "run"), **TWO_CYCLES))
    full = next(s for s in res.steps if s["name"] == "full_sgdr")
    assert full["cycles"] == 2 and full["averaged_cycles"] == 2 and len(seen) == 1
    ends, avg = seen[0]
    final = res.learn.model.state_dict()
    float_keys = [k for k, v in avg.items() if v.is_floating_point()]
    changed = [k for k in float_keys if not torch.equal(ends[0][k], ends[1][k])]  # trained in cycle 2
    assert len(ends) == 2 and changed
    assert all(torch.allclose(avg[k], (ends[0][k] + ends[1][k]) / 2) for k in changed)
    on_avg = all(torch.allclose(final[k].cpu(), avg[k]) for k in float_keys)
    assert on_avg == full["averaged_kept"]
    assert full["averaged_kept"] == (full["averaged_valid_loss"] < full["best_valid_loss"])
    if full["averaged_kept"]:
        assert full["valid_loss"] == pytest.approx(full["averaged_valid_loss"])
        assert res.valid_loss == pytest.approx(full["averaged_valid_loss"], rel=1e-4)
    else:  # the restored best: a cycle end, or (epoch 0) the weights step 8 started from
        assert full["valid_loss"] == pytest.approx(full["best_valid_loss"])
        on_end = [all(torch.equal(final[k].cpu(), e[k]) for k in float_keys) for e in ends]
        assert any(on_end) == (full["best_epoch"] > 0)


def test_step8_without_averaging_keeps_no_cycle_ends(tmp_path, monkeypatch):
    import fastlesson.recipe as recipe

    monkeypatch.setattr(recipe, "average_states", lambda states: pytest.fail("averaged with average_cycles=1"))
    data = write_image_folder(tmp_path / "data")
    with contextlib.redirect_stdout(io.StringIO()):
        res = run_recipe(RecipeConfig(data=str(data), out=str(tmp_path / "run"), average_cycles=1, **TWO_CYCLES))
    full = next(s for s in res.steps if s["name"] == "full_sgdr")
    assert full["cycles"] == 2 and "averaged_cycles" not in full


@pytest.mark.parametrize("best_loss,kept", [(math.inf, True), (-1.0, False)])
def test_average_cycle_ends_keeps_the_average_only_when_its_loss_is_lower(tiny_learner, tmp_path, best_loss, kept):
    """The averaged weights are validated once; the model keeps them only when that loss beats the best
    cycle end's, else it is put back exactly as it was. The ends are released either way."""
    from fastlesson.callbacks import average_states, state_copy
    from fastlesson.recipe import RecipeState, _average_cycle_ends

    learn = tiny_learner()
    before = state_copy(learn.model)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in before.items()}
    state = RecipeState(cfg=RecipeConfig(average_cycles=2), out=tmp_path, learn=learn, ends=[before, other])
    with contextlib.redirect_stdout(io.StringIO()):
        out = _average_cycle_ends(state, best_loss)
    assert (out["averaged_cycles"], out["averaged_kept"]) == (2, kept) and state.ends == []
    want = average_states([before, other]) if kept else before
    assert all(torch.equal(learn.model.state_dict()[k], want[k]) for k in want)
    assert math.isfinite(out["averaged_valid_loss"]) and 0 <= out["averaged_accuracy"] <= 1


def test_average_cycle_ends_needs_two_ends(tiny_learner, tmp_path):
    from fastlesson.callbacks import state_copy
    from fastlesson.recipe import RecipeState, _average_cycle_ends

    learn = tiny_learner()
    state = RecipeState(cfg=RecipeConfig(average_cycles=3), out=tmp_path, learn=learn, ends=[state_copy(learn.model)])
    assert _average_cycle_ends(state, 1.0) == {}


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_average_cycles_must_be_a_whole_number_of_cycles(value):
    with pytest.raises(ValueError, match=rf"RecipeConfig.average_cycles={value!r} is not valid: use an integer >= 1"):
        RecipeConfig(average_cycles=value).validate()
