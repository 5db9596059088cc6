"""Each step function of the recipe on a tiny image folder: what it promises, one test per step.

One module fixture calls the steps in order, as run_recipe and notebook 05 do, and keeps each step's
result with copies of the weights before and after it.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlesson import recipe
from fastlesson.recipe import STEPS, RecipeConfig, start_recipe

from _recipe_helpers import write_image_folder


def _weights(learn) -> dict:
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    data = write_image_folder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    res, before, after, printed = {}, {}, {}, {}
    try:
        state = start_recipe(RecipeConfig(data=str(data), smoke=True, out=str(out)))
        for name, step in STEPS:
            before[name] = _weights(state.learn) if state.learn is not None else None
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                res[name] = step(state)
            printed[name], after[name] = buf.getvalue(), _weights(state.learn)
            if name == "lr_find_head":
                res["_head_learn"] = state.head_learn
        with contextlib.redirect_stdout(io.StringIO()):
            res["evaluate"] = recipe.step_evaluate(state)
            res["report"] = recipe.step_report(state)
    finally:
        torch.set_num_threads(threads)
    return state, res, before, after, printed


def _rows(state, step):
    return [r for r in state.log.rows if r["step"] == step]


def _same(a: dict, b: dict, keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


def test_step_data_builds_a_frozen_learner_and_the_run_folder(walk):
    state, res, _, _, printed = walk
    r = res["data"]
    assert (r["index"], r["name"], r["n_classes"], r["n_train"], r["n_valid"]) == (1, "data", 3, 24, 12)
    assert state.fingerprint["n_train"] == 24 and len(state.fingerprint["sha256"]) == 64
    assert json.loads((state.out / "config.json").read_text())["size"] == 32
    assert "Step 1/8" in printed["data"] and r["n_skipped"] == 0


def test_label_smoothing_reaches_the_learner_and_the_run_config(tmp_path, walk):
    from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat

    state, *_ = walk
    loss = state.learn.loss_func  # the default: label smoothing 0.1
    assert isinstance(loss, LabelSmoothingCrossEntropyFlat) and loss.func.eps == pytest.approx(0.1)
    assert json.loads((state.out / "config.json").read_text())["label_smoothing"] == 0.1
    data = write_image_folder(tmp_path / "data")
    for eps, kind in ((0.2, LabelSmoothingCrossEntropyFlat), (0.0, CrossEntropyLossFlat)):
        other = start_recipe(RecipeConfig(data=str(data), smoke=True, out=str(tmp_path / f"run{eps}"),
                                          label_smoothing=eps))
        with contextlib.redirect_stdout(io.StringIO()):
            recipe.step_data(other)
        assert type(other.learn.loss_func) is kind  # 0: fastai's plain cross-entropy
        assert json.loads((other.out / "config.json").read_text())["label_smoothing"] == eps
    with pytest.raises(ValueError, match="RecipeConfig.label_smoothing=1"):
        RecipeConfig(label_smoothing=1).effective()


def test_step_lr_find_head_picks_an_lr_and_leaves_the_weights(walk):
    state, res, before, after, _ = walk
    r = res["lr_find_head"]
    assert r["lr"] == state.lr_head > 0 and r["epochs"] == 0  # a sweep, not training epochs
    assert _same(before["lr_find_head"], after["lr_find_head"])
    head = res["_head_learn"]
    assert head.model is state.learn.model[1] and len(head.features.train_y) == 24  # activations cached
    assert (state.out / "lr_find_head.png").is_file() and state.times["head_batch"] > 0


def test_step_precompute_trains_only_the_head(walk):
    state, res, before, after, _ = walk
    r = res["precompute"]
    assert r["epochs"] == state.precompute_epochs == 1 and r["lr"] == state.lr_head
    assert len(_rows(state, "precompute")) == 1 and r["accuracy"] is not None
    body = [k for k in before["precompute"] if k.startswith("0.")]
    assert _same(before["precompute"], after["precompute"], body)
    assert not _same(before["precompute"], after["precompute"])
    assert state.head_learn is None  # cache freed after the step


def test_step_head_sgdr_keeps_the_body_exactly(walk):
    state, res, before, after, _ = walk
    r = res["head_sgdr"]
    assert r["epochs"] == state.head_cycles == 1 and r["valid_loss"] is not None
    body = [k for k in before["head_sgdr"] if k.startswith("0.")]  # BatchNorm statistics included
    assert _same(before["head_sgdr"], after["head_sgdr"], body)
    assert state.times["head_epoch_train"] > 0 and state.times["valid"] > 0


def test_step_unfreeze_trains_from_freeze_to(walk):
    state, res, before, after, _ = walk
    r = res["unfreeze"]
    assert r["trainable_groups"] == len(state.ratios) - state.cfg.freeze_to
    assert r["bn_freeze"] is True and _same(before["unfreeze"], after["unfreeze"])


def test_step_discriminative_spaces_group_lrs_by_lr_factor(walk):
    state, res, *_ = walk
    ratios = np.array(res["discriminative"]["ratios"])
    assert ratios[-1] == 1.0 and np.allclose(ratios[:-1] / ratios[1:], 1 / state.cfg.lr_factor)


def test_step_lr_find_full_clamps_to_the_head_lr_and_leaves_the_weights(walk):
    state, res, before, after, _ = walk
    lrs = np.array(res["lr_find_full"]["lr"])
    assert np.allclose(lrs, state.lrs_full) and np.allclose(lrs / lrs[-1], state.ratios)
    assert state.lr_head / 10 <= lrs[-1] <= state.lr_head
    assert _same(before["lr_find_full"], after["lr_find_full"])


def test_step_full_sgdr_restores_the_best_weights_and_reports_them(walk):
    state, res, before, after, printed = walk
    r = res["full_sgdr"]
    assert (r["cycles"], r["epochs"]) == (1, 1) and "epochs_max=1" in r["reason"]
    assert r["valid_loss"] == pytest.approx(r["best_valid_loss"], rel=1e-6)  # the restored model's row
    assert res["evaluate"]["valid_loss"] == pytest.approx(r["best_valid_loss"], rel=1e-4, abs=1e-5)
    assert state.log not in state.learn.cbs  # the run log is detached after the last training step
    assert "cycle 1: 1 epoch(s)" in printed["full_sgdr"]


def test_step_evaluate_and_report(walk):
    state, res, *_ = walk
    final = res["evaluate"]
    preds, targs = state.learn.get_preds()
    assert final["accuracy"] == pytest.approx(float((preds.argmax(1) == targs).float().mean()))
    result = res["report"]
    assert result.accuracy == final["accuracy"] and [s["index"] for s in result.steps] == list(range(1, 9))
    for f in ("metrics.json", "report.md", "history.csv", "model.safetensors"):
        assert (state.out / f).is_file()
    assert not (state.out / "checkpoint").exists()  # steps called by hand write no checkpoints


# ---------------------------------------------------------------- notebook 05 calls exactly these steps

NOTEBOOK = Path(__file__).resolve().parents[1] / "nbs" / "05_recipe_flowers.py"
# what a cell would call if it re-implemented a step instead of calling it
STEP_LOGIC = {"fit", "fit_one_cycle", "fit_sgdr", "fine_tune", "fit_until_overfit", "find_lr", "lr_find",
              "freeze", "freeze_to", "unfreeze", "precompute_head", "precompute_learner", "lr_groups",
              "load_data", "create_learner", "requires_grad_", "get_preds", "validate", "tta", "rise_lr"}


def _code_cells(text: str) -> list[str]:
    cells, cur, is_code = [], [], False
    for line in text.splitlines():
        if line.startswith("# %%"):
            if is_code:
                cells.append("\n".join(cur))
            cur, is_code = [], "[markdown]" not in line
            continue
        if not line.lstrip().startswith("%"):  # IPython magics are not Python
            cur.append(line)
    if is_code:
        cells.append("\n".join(cur))
    return cells


def _calls(code: str) -> list[str]:
    import ast

    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call):
            f = node.func
            names.append(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def _step_cells(text: str) -> tuple[list[str], list[str]]:
    """(step functions called, one entry per cell that calls any, in order; step logic called)."""
    steps, logic = [], []
    for cell in _code_cells(text):
        calls = _calls(cell)
        called = [c for c in calls if c.startswith("step_")]
        if len(called) > 1:
            raise AssertionError(f"one step per cell, this cell calls {called}:\n{cell}")
        steps += called
        logic += [c for c in calls if c in STEP_LOGIC]
    return steps, logic


def test_notebook_05_calls_each_step_function_once_in_order_and_no_step_logic():
    steps, logic = _step_cells(NOTEBOOK.read_text())
    assert steps == [f.__name__ for _, f in STEPS] + ["step_evaluate", "step_report"]
    assert logic == [], f"notebook 05 does a step's work itself: {logic}; call the step function instead"


def test_the_notebook_check_catches_step_logic_in_a_cell():
    text = NOTEBOOK.read_text().replace("step_full_sgdr(state)",
                                        "fit_until_overfit(state.learn, state.lrs_full, 7)")
    steps, logic = _step_cells(text)
    assert "step_full_sgdr" not in steps and logic == ["fit_until_overfit"]
    bad = NOTEBOOK.read_text().replace("step_unfreeze(state)", "freeze_to(state.learn, 1)")
    assert _step_cells(bad)[1] == ["freeze_to"]


def test_the_ipynb_is_the_py_source_without_outputs():
    import jupytext

    nb = json.loads(NOTEBOOK.with_suffix(".ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    py = jupytext.read(NOTEBOOK)
    assert ["".join(c["source"]) for c in code] == [c.source for c in py.cells if c.cell_type == "code"]
