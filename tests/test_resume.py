"""Resume: a run killed with SIGKILL in step 8 and resumed ends exactly as a run never interrupted;
refused resumes; every optimizer's state loads with torch.load(weights_only=True)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlesson.optim import OPTIMIZERS, load_opt_state_dict, opt_func, opt_state_dict
from fastlesson.schedule import fit_one_cycle, fit_sgdr, freeze_to

from _recipe_helpers import write_image_folder

REPO = Path(__file__).resolve().parents[1]
# smoke-sized, but two SGDR cycles in step 8 (1 + 2 epochs): the kill lands in the second
CFG = dict(size=32, bs=8, epochs_max=3, precompute_epochs=1, head_cycles=1, lr_find_iters=32, top_losses=4,
           tta=True, seed=3)
# what may differ between two processes although the weights are identical: timings, and the ONNX export's
# record (its file bytes and float check are not stable across processes; the weights are compared directly)
TIMING_KEYS = {"seconds", "seconds_total", "seconds_cache", "seconds_train", "note", "resumed", "summary",
               "onnx"}


def _python(code: str, log: Path) -> subprocess.Popen:
    """`python -c code` in a fresh process (one thread: the same float results in every process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    prelude = "import torch; torch.set_num_threads(1); from fastlesson.recipe import *; "
    return subprocess.Popen([sys.executable, "-c", prelude + code], env=env, cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _run(data: Path, out: Path, **extra) -> subprocess.Popen:
    cfg = {**CFG, **extra, "data": str(data), "out": str(out)}
    return _python(f"run_recipe(RecipeConfig(**{cfg!r}))", out.parent / f"{out.name}.log")


def _finish(p: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert p.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def _strip(obj):
    """metrics.json without wall-clock numbers and the resume record."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _history(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(out / "history.csv"))]


def _wait_for_cycle_checkpoint(p: subprocess.Popen, out: Path, timeout: float = 300) -> dict:
    """Poll state.json until step 8's first cycle is checkpointed (the process still running)."""
    state = out / "checkpoint" / "state.json"
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if p.poll() is not None:
            pytest.fail(f"the run ended (rc {p.returncode}) before step 8's first cycle was checkpointed")
        try:
            doc = json.loads(state.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            doc = {}
        if doc.get("after") == "full_sgdr cycle 1":
            return doc
        time.sleep(0.02)
    pytest.fail("no step-8 cycle checkpoint in time")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and a run killed with SIGKILL in step 8's second cycle, then resumed.

    The two runs start together (one thread each, so they use the two cores and do not slow each other's
    arithmetic, and their results do not depend on what else runs)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_image_folder(root / "data", n_train=24, n_valid=4)
    a, b = root / "a", root / "b"
    pa, pb = _run(data, a), _run(data, b)
    try:
        doc = _wait_for_cycle_checkpoint(pb, b)
        os.kill(pb.pid, signal.SIGKILL)
        assert pb.wait(timeout=60) == -signal.SIGKILL
        _finish(pa, root / "a.log")
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
    assert not (b / "metrics.json").exists()  # really killed before the end
    pr = _python(f"resume_recipe({str(b)!r})", root / "resume.log")
    _finish(pr, root / "resume.log")
    return data, a, b, doc, (root / "resume.log").read_text()


def test_resume_after_sigkill_equals_an_uninterrupted_run(runs):
    _, a, b, doc, printed = runs
    assert doc["done"] == ["data", "lr_find_head", "precompute", "head_sgdr", "unfreeze", "discriminative",
                           "lr_find_full"]  # killed inside step 8
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert _strip(ma) == _strip(mb)
    assert _history(a) == _history(b)
    full = next(s for s in mb["steps"] if s["name"] == "full_sgdr")
    assert full["cycles"] == 2 and full["epochs"] == 3  # the resumed run did train the second cycle
    assert "Resuming" in printed and "cycle 1" in printed


def test_resumed_run_says_so_and_cleans_up(runs):
    _, a, b, _, _ = runs
    mb = json.loads((b / "metrics.json").read_text())
    assert [r["after"] for r in mb["resumed"]] == ["full_sgdr cycle 1"]
    assert json.loads((a / "metrics.json").read_text())["resumed"] == []
    md = (b / "report.md").read_text()
    assert "resumed** at " + mb["resumed"][0]["at"] in md and "after full_sgdr cycle 1" in md
    assert "resumed" not in (a / "report.md").read_text()
    assert not (a / "checkpoint").exists() and not (b / "checkpoint").exists()  # removed on completion


def test_resume_of_a_finished_run_says_it_is_finished(runs):
    from fastlesson.recipe import resume_recipe

    _, a, *_ = runs
    with pytest.raises(ValueError, match="is a finished run"):
        resume_recipe(a)


def _interrupted_copy(tmp_path, data, stop_after: str = "head_sgdr") -> Path:
    """A run stopped (in-process) right after a step's checkpoint, as a kill there would leave it."""
    import fastlesson.recipe as recipe

    out = tmp_path / "run"

    class Stop(Exception):
        pass

    real = recipe._checkpoint

    def checkpoint_then_stop(state, after):
        real(state, after)
        if after == stop_after:
            raise Stop

    mp = pytest.MonkeyPatch()
    mp.setattr(recipe, "_checkpoint", checkpoint_then_stop)
    try:
        with pytest.raises(Stop), _quiet():
            recipe.run_recipe(recipe.RecipeConfig(**{**CFG, "data": str(data), "out": str(out)}))
    finally:
        mp.undo()
    return out


def _quiet():
    import contextlib

    return contextlib.redirect_stdout(io.StringIO())


def test_resume_refuses_changed_config(tmp_path):
    from fastlesson.recipe import resume_recipe

    data = write_image_folder(tmp_path / "data")
    out = _interrupted_copy(tmp_path, data, stop_after="data")
    cfg = json.loads((out / "config.json").read_text())
    cfg["lr_factor"] = 3.0
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json differs.*lr_factor: 10\.0 when the run started, 3\.0 now"):
        resume_recipe(out)


def test_resume_refuses_changed_data(tmp_path):
    from fastlesson.recipe import resume_recipe

    data = write_image_folder(tmp_path / "data")
    out = _interrupted_copy(tmp_path, data, stop_after="data")
    extra = next((data / "train" / "a").glob("*.jpg"))
    (data / "train" / "a" / "extra.jpg").write_bytes(extra.read_bytes())
    with pytest.raises(ValueError, match=r"data .* differ .*training images: 24 when the run started, 25 now"):
        with _quiet():
            resume_recipe(out)


def test_resume_after_a_step_continues_from_the_next_step(tmp_path):
    """Stopped after step 4's checkpoint: the resume starts at step 5 and keeps the checkpoint files
    in formats that load without unpickling."""
    from fastlesson.recipe import resume_recipe

    data = write_image_folder(tmp_path / "data")
    out = _interrupted_copy(tmp_path, data, stop_after="head_sgdr")
    doc = json.loads((out / "checkpoint" / "state.json").read_text())
    assert doc["after"] == "head_sgdr" and doc["done"][-1] == "head_sgdr"
    torch.load(out / "checkpoint" / doc["files"]["optimizer"], weights_only=True)
    load_file(str(out / "checkpoint" / doc["files"]["model"]))
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        res = resume_recipe(out)
    printed = buf.getvalue()
    assert "Step 4/8" not in printed and "Step 5/8" in printed and "Step 8/8" in printed
    assert [s["index"] for s in res.steps] == list(range(1, 9))
    assert res.metrics["resumed"][0]["after"] == "head_sgdr"


def test_no_checkpoint_is_refused(tmp_path):
    from fastlesson.recipe import resume_recipe

    (tmp_path / "config.json").write_text(json.dumps({"data": "sample"}))
    with pytest.raises(ValueError, match="has no checkpoint"):
        resume_recipe(tmp_path)


# ---------------------------------------------------------------- optimizer state, weights_only


def _schedules(learn, kind: str):
    if kind == "one_cycle":
        fit_one_cycle(learn, 1, lr_max=slice(1e-4, 1e-3))  # discriminative LRs
    else:
        fit_sgdr(learn, 1, 1, lr_max=[1e-4, 3e-4, 1e-3])


@pytest.mark.parametrize("kind", ["one_cycle", "sgdr"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_loads_weights_only_and_continues_exactly(tiny_learner, name, kind):
    """After one-cycle or SGDR with discriminative LRs, opt_state_dict round-trips through
    torch.load(weights_only=True); loaded into a fresh learner, the next epoch is bit for bit the one
    the original learner trains."""
    def make():
        learn = tiny_learner(opt_func=opt_func(name))
        freeze_to(learn, 1, verbose=False)
        return learn

    learn = make()
    with learn.no_bar(), learn.no_logging():
        _schedules(learn, kind)
    buf = io.BytesIO()
    torch.save(opt_state_dict(learn.opt), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    twin = make()
    twin.model.load_state_dict(learn.model.state_dict())
    load_opt_state_dict(twin.opt, state)
    for a, b in zip(learn.dls.loaders, twin.dls.loaders):
        b.rng.setstate(a.rng.getstate())  # the same batch order
    for lrn in (learn, twin):
        torch.manual_seed(0)
        with lrn.no_bar(), lrn.no_logging():
            fit_sgdr(lrn, 1, 1, lr_max=[1e-4, 3e-4, 1e-3])
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, twin.model.state_dict()[k]), (name, kind, k)
